//! `sqlx::migrate!` embeds `../migrations` at compile time; cargo only watches
//! files inside the package, so tell it to rebuild when a migration changes.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
