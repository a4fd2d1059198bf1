//! Print the simulator's default cost table with each row's basis and source
//! (`cargo xtask costs`).

fn main() {
    print!("{}", backend_sim::cost::table());
}
