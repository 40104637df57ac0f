//! Rebuilds the gateway when the web app's build (`web/dist`, embedded by `rust-embed`) changes.
//! Without one yet, `web/` is watched instead, so that the build appearing there is noticed (a
//! path that does not exist would make cargo rebuild the gateway every time).

fn main() {
    if std::path::Path::new("../web/dist").exists() {
        println!("cargo:rerun-if-changed=../web/dist");
    } else {
        println!("cargo:rerun-if-changed=../web");
    }
}
