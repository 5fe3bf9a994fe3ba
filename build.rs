fn main() {
    // Rebuild when a migration is added: sqlx::migrate! embeds the directory.
    println!("cargo:rerun-if-changed=migrations");
}
