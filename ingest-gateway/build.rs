//! Rebuilds the gateway when the web app's build (`web/dist`, embedded by `rust-embed`) changes,
//! or appears after a build made without it.

fn main() {
    println!("cargo:rerun-if-changed=../web/dist");
}
