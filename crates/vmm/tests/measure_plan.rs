//! The launch plan is what a real launch consumes: feeding it through vmsa-core's launch API
//! (the path `vmm run --firmware` takes) on vmsa-core's in-memory test platform makes the
//! "firmware" measure pages whose PAGE_INFO chain / SHA-256 stream is sev-snp-measure's digest.

mod measure_support;

use std::collections::HashMap;

use backend_sim::measure::{SevEsLaunchDigest, SnpLaunchDigest, hex as hexstr};
use measure_support::*;
use vmm::measure::ovmf::Ovmf;
use vmm::measure::{LaunchPlan, PlanConfig, VcpuCount};
use vmsa_core::testing::TestPlatform;
use vmsa_core::{Gfn, Gpa, INITIAL_VMSA_GPA, PAGE_SIZE, SNP_POLICY_RSVD_MBO, SnpPageType, Vm, VmKind};

/// Launch `plan` through vmsa-core and digest what the platform was asked to measure.
fn replay(plan: &LaunchPlan) -> String {
    let mut vm = Vm::without_events(TestPlatform::default(), plan.vm_config());
    for v in plan.vmsas() {
        vm.create_vcpu(v.vcpu).unwrap();
        vm.set_registers(v.vcpu, &v.save_area).unwrap();
    }
    let snp = plan.kind() == VmKind::Snp;
    vm.launch_start(if snp { SNP_POLICY_RSVD_MBO } else { 0 })
        .unwrap();
    let mut gpa_of = HashMap::new();
    for d in plan.data_updates() {
        for i in 0..d.len / PAGE_SIZE {
            let gpa = d.gpa.0 + i * PAGE_SIZE;
            gpa_of.insert(vm.platform().map_gmem(Gfn(gpa >> 12)), gpa);
        }
        vm.launch_update_data(d.gpa, d.len, d.page_type, d.contents.as_deref())
            .unwrap();
    }
    if !snp {
        vm.launch_update_vmsas().unwrap();
    }
    vm.launch_finish([0; 32]).unwrap();
    let p = vm.platform();
    let digest = if snp {
        let mut ld = SnpLaunchDigest::new();
        for (pfn, ty) in p.measured() {
            let gpa = gpa_of.get(&pfn).copied().map_or(INITIAL_VMSA_GPA, Gpa);
            ld.update(gpa, SnpPageType::from_raw(ty).unwrap(), &p.frame(pfn));
        }
        ld.hex()
    } else {
        let mut ld = SevEsLaunchDigest::new();
        for (pfn, _) in p.measured() {
            ld.update(&p.frame(pfn)[..]);
        }
        hexstr(&ld.digest())
    };
    assert_eq!(vm.teardown().leaked, 0);
    digest
}

#[test]
fn a_launch_through_vmsa_core_reaches_sev_snp_measures_digest() {
    let cases =
        fixture_cases(|c| c["dump"] == true && c["firmware"] == DEBIAN_OVMF && c.get("kernel").is_none());
    assert!(cases.len() >= 6, "one per mode and VMM type");
    let ovmf = Ovmf::parse(std::fs::read(DEBIAN_OVMF).unwrap()).unwrap();
    for c in cases {
        let kind = if c["mode"] == "snp" {
            VmKind::Snp
        } else {
            VmKind::SevEs
        };
        let config = PlanConfig {
            kind,
            vcpus: VcpuCount::new(c["vcpus"].as_u64().unwrap() as u32).unwrap(),
            vcpu_sig: case_vcpu_sig(c),
            vmm_type: c["vmm_type"].as_str().unwrap().parse().unwrap(),
            guest_features: c["guest_features"]
                .as_str()
                .map_or(0, |f| vmm::measure::parse_hex_u64(f).unwrap()),
        };
        let plan = LaunchPlan::build(&ovmf, &config, None).unwrap();
        let want = c["digest"].as_str().unwrap();
        assert_eq!(plan.measure().hex(), want, "measure, case {}", c["id"]);
        assert_eq!(replay(&plan), want, "replayed launch, case {}", c["id"]);
    }
}
