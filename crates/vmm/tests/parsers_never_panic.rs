//! Every parser the VMM feeds with user input returns an error (or a value) on any input and
//! never panics: firmware images (random, and Debian's OVMF with random bytes flipped in its
//! footer table and SEV metadata), the launch plan built from whatever parsed, guest scripts,
//! fault plans, sizes and vCPU counts.

use proptest::prelude::*;
use vmm::measure::VcpuCount;
use vmm::measure::ovmf::Ovmf;
use vmm::measure::plan::{LaunchPlan, PlanConfig};
use vmm::measure::vmm_types::VmmType;
use vmsa_core::VmKind;

const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// Plan every mode and VMM type; measure one plan (measuring hashes the whole image, which is
/// the slow part and the same code for every plan).
fn plan_and_measure(ovmf: &Ovmf) {
    let mut measured = false;
    for kind in [VmKind::Snp, VmKind::SevEs] {
        for vmm_type in [VmmType::Qemu, VmmType::Ec2, VmmType::Gce] {
            let config = PlanConfig {
                kind,
                vcpus: VcpuCount::new(2).unwrap(),
                vcpu_sig: 0x00a1_0f10,
                vmm_type,
                guest_features: if kind == VmKind::Snp { 1 } else { 0 },
            };
            if let Ok(plan) = LaunchPlan::build(ovmf, &config, None)
                && !measured
            {
                let _ = plan.measure();
                measured = true;
            }
        }
    }
}

fn debian_ovmf() -> Vec<u8> {
    static IMAGE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMAGE
        .get_or_init(|| {
            std::fs::read(DEBIAN_OVMF).unwrap_or_else(|e| {
                panic!("{DEBIAN_OVMF}: {e}: install Debian's OVMF (apt-get install ovmf)")
            })
        })
        .clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_images_never_panic(pages in 1usize..5, seed in any::<u64>(), tail in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut data: Vec<u8> = (0..pages * 4096)
            .map(|i| (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i as u64) >> 29) as u8)
            .collect();
        let n = data.len();
        let k = tail.len().min(n);
        data[n - k..].copy_from_slice(&tail[..k]);
        if let Ok(ovmf) = Ovmf::parse(data) {
            plan_and_measure(&ovmf);
        }
    }

    #[test]
    fn corrupted_ovmf_never_panics(flips in prop::collection::vec((0usize..4096, any::<u8>()), 1..24), in_footer in any::<bool>()) {
        let mut data = debian_ovmf();
        let n = data.len();
        // The footer GUID table lives in the last 4 KiB; the SEV metadata it points at sits in
        // the last 64 KiB.
        let window = if in_footer { 4096 } else { 64 << 10 };
        for (off, byte) in flips {
            let at = n - window + (off * (window / 4096)) % window;
            data[at] ^= byte | 1;
        }
        if let Ok(ovmf) = Ovmf::parse(data) {
            plan_and_measure(&ovmf);
        }
    }

    #[test]
    fn command_line_values_never_panic(s in "\\PC{0,40}") {
        let _ = s.parse::<vmm::size::ByteSize>();
        let _ = s.parse::<VcpuCount>();
        let _ = s.parse::<backend_sim::FaultPlan>();
        let _ = s.parse::<vmm::run::GuestSpec>();
        let _ = backend_sim::guest::GuestScript::from_json("prop", &s);
    }

    #[test]
    fn script_shaped_json_never_panics(action in "[a-z_]{1,12}", vcpu in any::<i64>(), gpa in any::<i64>(), pages in any::<i64>()) {
        let text = format!(
            r#"{{"actions":[{{"action":"{action}","vcpu":{vcpu},"gpa":{gpa},"pages":{pages},"apic_id":{vcpu}}}]}}"#
        );
        let _ = backend_sim::guest::GuestScript::from_json("prop", &text);
    }
}
