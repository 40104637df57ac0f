//! Addresses as they may be shown to people: scheme, host, port and path, never credentials.

use url::Url;

/// The URL without user name, password or query string, for errors and logs.
///
/// Query strings are dropped too because drivers accept credentials there (`?password=…`).
pub fn redacted_address(url: &Url) -> String {
    let host = url.host_str().unwrap_or("<no host>");
    let port = url
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let path = match url.path() {
        "" | "/" => "",
        path => path,
    };
    format!("{}://{host}{port}{path}", url.scheme())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_query_never_show() {
        let url = Url::parse("postgres://alice:s3cret@db.example:6543/biofeed?password=x").unwrap();
        assert_eq!(redacted_address(&url), "postgres://db.example:6543/biofeed");
    }

    #[test]
    fn known_default_ports_are_spelled_out() {
        let url = Url::parse("http://127.0.0.1/").unwrap();
        assert_eq!(redacted_address(&url), "http://127.0.0.1:80");
    }
}
