//! Who may register a shared-memory region, and which objects.
//!
//! Registering a region makes the server open a `/dev/shm` object with its own permissions,
//! read inputs from it and write outputs into it. Open to everyone, that lets any client that
//! reaches the port read and overwrite every object the server's user can open read-write,
//! including other programs' (a confused deputy). So registration is an administrative act:
//! by default only a client on the loopback interface may register, and only objects whose
//! names start with a configured prefix. Shared memory only works between processes of one
//! host anyway; a client that reaches the server over a non-loopback address is either on
//! another host (its registration cannot be meant) or arranged by the operator (who can say so
//! with [`RegistrationPolicy::allow_remote`]).
//!
//! This server has no Unix-socket listener, so "local" means a loopback TCP peer.

use std::net::IpAddr;

use oxserve_core::{Error, ErrorKind, Result};

/// The default [`RegistrationPolicy::key_prefix`]: an object name must start with it. Our own
/// tools and tests name their objects `oxserve_*` / `oxserve-*`; a tritonclient example that
/// uses a key like `/input_simple` needs `--shared-memory-prefix ""` or a key renamed under it.
pub const DEFAULT_KEY_PREFIX: &str = "oxserve";

/// Who may register regions, and which objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationPolicy {
    /// An object's name must start with this (leading slashes of both are ignored, as
    /// `shm_open` ignores them); empty: any name.
    pub key_prefix: String,
    /// Accept registrations from clients whose address is not loopback (or unknown).
    pub allow_remote: bool,
}

impl Default for RegistrationPolicy {
    fn default() -> Self {
        RegistrationPolicy {
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
            allow_remote: false,
        }
    }
}

impl RegistrationPolicy {
    /// Any client, any object: Triton's behaviour, for tests and trusted networks.
    pub fn open() -> Self {
        RegistrationPolicy {
            key_prefix: String::new(),
            allow_remote: true,
        }
    }
}

/// Whether a client at `peer` may register the object `key`: `Ok`, or PERMISSION_DENIED with
/// the reason and the setting that would allow it. `None` is a client whose address the
/// transport did not report; it is treated as remote (fail closed).
pub fn admit_registration(policy: &RegistrationPolicy, peer: Option<IpAddr>, key: &str) -> Result<()> {
    if !policy.allow_remote && !peer.is_some_and(is_loopback) {
        let who = peer.map_or_else(|| "a client of unknown address".to_string(), |ip| ip.to_string());
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "registering shared memory is allowed only from the server's own host (loopback), \
                 not from {who}; the operator can allow it with --allow-remote-shared-memory true"
            ),
        ));
    }
    let prefix = policy.key_prefix.trim_start_matches('/');
    if !key.trim_start_matches('/').starts_with(prefix) {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "shared memory key '{key}' is outside the prefix this server accepts: name the \
                 object '/{prefix}...' (the operator sets the prefix with --shared-memory-prefix)"
            ),
        ));
    }
    Ok(())
}

/// 127.0.0.0/8, ::1, and 127.0.0.0/8 mapped into IPv6 (`::ffff:127.x.y.z`, how a dual-stack
/// listener reports an IPv4 loopback client). The deprecated IPv4-compatible form
/// (`::127.0.0.1`) is not loopback.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("an address"))
    }

    #[test]
    fn loopback_addresses() {
        for yes in [
            "127.0.0.1",
            "127.255.0.9",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:127.1.2.3",
        ] {
            assert!(is_loopback(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "10.0.0.1",
            "0.0.0.0",
            "192.168.1.5",
            "::",
            "::2",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_loopback(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn by_default_only_loopback_clients_register_keys_under_the_prefix() {
        let policy = RegistrationPolicy::default();
        for peer in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            admit_registration(&policy, ip(peer), "/oxserve_input").unwrap();
            admit_registration(&policy, ip(peer), "oxserve-bench-1-in0").unwrap();
        }
        for peer in [ip("10.1.2.3"), ip("2001:db8::7"), ip("::ffff:192.0.2.1"), None] {
            let e = admit_registration(&policy, peer, "/oxserve_input").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied);
            assert!(e.message().contains("loopback"), "{e:?}");
            assert!(e.message().contains("--allow-remote-shared-memory"), "{e:?}");
        }
        let e = admit_registration(&policy, None, "/x").unwrap_err();
        assert!(e.message().contains("unknown address"), "{e:?}");
        for key in ["/input_simple", "/psm_1234", "/PostgreSQL.42", "", "/", "oxserv"] {
            let e = admit_registration(&policy, ip("127.0.0.1"), key).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{key}");
            assert!(e.message().contains("--shared-memory-prefix"), "{e:?}");
            assert!(e.message().contains("'/oxserve...'"), "{e:?}");
        }
    }

    #[test]
    fn the_prefix_and_remote_clients_are_configurable() {
        let policy = RegistrationPolicy {
            key_prefix: "/team_a.".into(),
            allow_remote: true,
        };
        // The prefix names objects as shm_open does: leading slashes are ignored on both sides.
        admit_registration(&policy, ip("10.0.0.8"), "team_a.x").unwrap();
        admit_registration(&policy, None, "//team_a.x").unwrap();
        assert!(admit_registration(&policy, ip("10.0.0.8"), "/team_b.x").is_err());
        // Empty prefix: any name (Triton's behaviour), still loopback-only unless allowed.
        let any_name = RegistrationPolicy {
            key_prefix: String::new(),
            allow_remote: false,
        };
        admit_registration(&any_name, ip("127.0.0.1"), "/input_simple").unwrap();
        assert!(admit_registration(&any_name, ip("10.0.0.8"), "/input_simple").is_err());
        admit_registration(&RegistrationPolicy::open(), None, "/input_simple").unwrap();
    }
}
