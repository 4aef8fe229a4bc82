//! API keys: loading them from a key file (or one token from the environment), and deciding
//! whether a request's `Authorization: Bearer <token>` may use an endpoint group.
//!
//! Only SHA-256 digests of the tokens are kept. A presented token is hashed and compared with
//! every configured digest in constant time (`subtle`), without stopping at a match, so timing
//! tells nothing about how much of a token was right or which key it was. Tokens are never
//! logged: the types that hold secrets redact them in `Debug`.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::routes::Scope;

/// Shortest plain token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// A set of scopes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    pub fn all() -> Scopes {
        Scopes(Scope::ALL.iter().fold(0, |bits, s| bits | s.bit()))
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    pub fn insert(&mut self, scope: Scope) {
        self.0 |= scope.bit();
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(Scope::ALL.into_iter().filter(|s| self.contains(*s)))
            .finish()
    }
}

/// One configured key: its name (for logs, errors and per-key rate limits), the digest of its
/// token, and what it may do.
#[derive(Clone)]
pub struct ApiKey {
    pub name: Arc<str>,
    digest: [u8; 32],
    pub scopes: Scopes,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("digest", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// A plain token while it is being read; never printed.
#[derive(Deserialize)]
#[serde(transparent)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    token: Option<Secret>,
    token_sha256: Option<String>,
    scopes: Vec<String>,
}

/// Why a key file was refused; said at start-up, never with a token in it.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read the API key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("API key file {path} is not valid: {message}")]
    Invalid { path: String, message: String },
}

/// The configured keys. Empty: authentication is off and every endpoint is open (the
/// behaviour of a server without keys).
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

/// The outcome of checking a request's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header, or not a bearer token.
    Missing,
    /// A bearer token that matches no key.
    Invalid,
    /// A known key without the scope the endpoint needs.
    Forbidden { key: Arc<str>, scope: Scope },
}

impl AuthError {
    /// The message a client sees.
    pub fn message(&self) -> String {
        match self {
            AuthError::Missing => {
                "missing API key: send the header 'Authorization: Bearer <key>'".to_string()
            }
            AuthError::Invalid => "invalid API key".to_string(),
            AuthError::Forbidden { key, scope } => {
                format!("API key '{key}' does not have the '{scope}' scope")
            }
        }
    }
}

impl ApiKeys {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Parses a key file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ApiKeys, KeyFileError> {
        let invalid = |message: String| KeyFileError::Invalid {
            path: origin.to_string(),
            message,
        };
        let file: KeyFile = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        let mut keys = ApiKeys::default();
        for (i, entry) in file.keys.into_iter().enumerate() {
            let key = parse_entry(entry).map_err(|m| invalid(format!("[[keys]] entry {}: {m}", i + 1)))?;
            keys.add(key).map_err(invalid)?;
        }
        // A key file is given to turn authentication on; one that names no key would leave
        // every endpoint open without anyone noticing.
        if keys.is_empty() {
            return Err(invalid("it defines no [[keys]]".into()));
        }
        Ok(keys)
    }

    /// Reads a key file (`--api-keys FILE`).
    pub fn from_file(path: &Path) -> Result<ApiKeys, KeyFileError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: origin.clone(),
            source,
        })?;
        warn_if_readable_by_others(path);
        ApiKeys::parse(&text, &origin)
    }

    /// Adds one key with every scope from a token given directly (the `OXSERVE_API_KEY`
    /// environment variable).
    pub fn add_token(&mut self, name: &str, token: &str) -> Result<(), String> {
        check_token(token)?;
        self.add(ApiKey {
            name: name.into(),
            digest: Sha256::digest(token.as_bytes()).into(),
            scopes: Scopes::all(),
        })
    }

    /// Adds one key with the given scopes from a token the server made itself (TorchServe's
    /// `key_file.json`).
    pub fn add_scoped_token(&mut self, name: &str, token: &str, scopes: &[Scope]) -> Result<(), String> {
        check_token(token)?;
        let mut set = Scopes::default();
        for scope in scopes {
            set.insert(*scope);
        }
        self.add(ApiKey {
            name: name.into(),
            digest: Sha256::digest(token.as_bytes()).into(),
            scopes: set,
        })
    }

    fn add(&mut self, key: ApiKey) -> Result<(), String> {
        if self.keys.iter().any(|k| k.name == key.name) {
            return Err(format!("two keys are named '{}'", key.name));
        }
        if self.keys.iter().any(|k| bool::from(k.digest.ct_eq(&key.digest))) {
            return Err(format!("key '{}' has the same token as another key", key.name));
        }
        self.keys.push(key);
        Ok(())
    }

    /// The key whose token was presented, compared in constant time against every key.
    fn find(&self, token: &[u8]) -> Option<&ApiKey> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for key in &self.keys {
            // No early exit: every key is compared whatever matched before.
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        found
    }

    /// The key of a request whose endpoint needs `scope` (`None`: an unknown endpoint, which
    /// any valid key may reach).
    pub fn authorize(&self, headers: &HeaderMap, scope: Option<Scope>) -> Result<&ApiKey, AuthError> {
        let token = bearer_token(headers).ok_or(AuthError::Missing)?;
        let key = self.find(token).ok_or(AuthError::Invalid)?;
        match scope {
            Some(scope) if !key.scopes.contains(scope) => Err(AuthError::Forbidden {
                key: key.name.clone(),
                scope,
            }),
            _ => Ok(key),
        }
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme in any case, as RFC 7235 says).
fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(http::header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

fn parse_entry(entry: KeyEntry) -> Result<ApiKey, String> {
    let name = entry.name.trim();
    if name.is_empty() {
        return Err("'name' is empty".into());
    }
    let digest = match (entry.token, entry.token_sha256) {
        (Some(token), None) => {
            check_token(&token.0).map_err(|m| format!("key '{name}': {m}"))?;
            Sha256::digest(token.0.as_bytes()).into()
        }
        (None, Some(hex)) => parse_sha256(&hex).ok_or_else(|| {
            format!("key '{name}': 'token_sha256' must be 64 hexadecimal digits (the SHA-256 of the token)")
        })?,
        (Some(_), Some(_)) => {
            return Err(format!(
                "key '{name}' has both 'token' and 'token_sha256'; give one"
            ));
        }
        (None, None) => return Err(format!("key '{name}' needs 'token' or 'token_sha256'")),
    };
    if entry.scopes.is_empty() {
        return Err(format!("key '{name}' has no scopes"));
    }
    let mut scopes = Scopes::default();
    for s in &entry.scopes {
        if s == "all" {
            scopes = Scopes::all();
        } else {
            let scope = Scope::parse(s).ok_or_else(|| {
                let valid: Vec<_> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "key '{name}': unknown scope '{s}' (valid: {}, all)",
                    valid.join(", ")
                )
            })?;
            scopes.insert(scope);
        }
    }
    Ok(ApiKey {
        name: name.into(),
        digest,
        scopes,
    })
}

/// A token must be usable in a header and long enough not to be guessed.
fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!("the token is shorter than {MIN_TOKEN_LEN} characters"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces".into());
    }
    Ok(())
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        tracing::warn!(file = %path.display(), "the API key file is readable by every user; chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_A: &str = "tok-aaaaaaaaaaaaaaaaaaaa";
    const TOKEN_B: &str = "tok-bbbbbbbbbbbbbbbbbbbb";

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, value.parse().expect("header value"));
        h
    }

    fn sha256_hex(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn two_keys() -> ApiKeys {
        let text = format!(
            r#"
[[keys]]
name = "reader"
token = "{TOKEN_A}"
scopes = ["infer", "metadata"]

[[keys]]
name = "admin"
token_sha256 = "{}"
scopes = ["all"]
"#,
            sha256_hex(TOKEN_B).to_uppercase()
        );
        ApiKeys::parse(&text, "keys.toml").expect("valid key file")
    }

    #[test]
    fn a_key_file_with_plain_and_hashed_tokens() {
        let keys = two_keys();
        assert_eq!(keys.len(), 2);
        let reader = keys.authorize(&headers(&format!("Bearer {TOKEN_A}")), Some(Scope::Infer));
        assert_eq!(reader.map(|k| &*k.name).ok(), Some("reader"));
        let admin = keys.authorize(&headers(&format!("bearer  {TOKEN_B} ")), Some(Scope::Repository));
        assert_eq!(admin.map(|k| &*k.name).ok(), Some("admin"));
        assert!(
            keys.find(TOKEN_B.as_bytes())
                .is_some_and(|k| k.scopes == Scopes::all())
        );
    }

    #[test]
    fn missing_unknown_and_wrong_scope() {
        let keys = two_keys();
        assert_eq!(
            keys.authorize(&HeaderMap::new(), Some(Scope::Infer)).err(),
            Some(AuthError::Missing)
        );
        assert_eq!(
            keys.authorize(&headers(&format!("Basic {TOKEN_A}")), None).err(),
            Some(AuthError::Missing)
        );
        assert_eq!(
            keys.authorize(&headers("Bearer "), None).err(),
            Some(AuthError::Missing)
        );
        assert_eq!(
            keys.authorize(&headers("Bearer"), None).err(),
            Some(AuthError::Missing)
        );
        assert_eq!(
            keys.authorize(&headers("Bearer tok-aaaaaaaaaaaaaaaaaaab"), None)
                .err(),
            Some(AuthError::Invalid)
        );
        // A prefix of a valid token is not a valid token.
        assert_eq!(
            keys.authorize(&headers("Bearer tok-aaaaaaaaaaaaaaaaaaa"), None)
                .err(),
            Some(AuthError::Invalid)
        );
        let denied = keys.authorize(&headers(&format!("Bearer {TOKEN_A}")), Some(Scope::Repository));
        assert_eq!(
            denied.err(),
            Some(AuthError::Forbidden {
                key: "reader".into(),
                scope: Scope::Repository
            })
        );
        // Unknown endpoints take any valid key.
        assert!(
            keys.authorize(&headers(&format!("Bearer {TOKEN_A}")), None)
                .is_ok()
        );
        assert!(
            AuthError::Forbidden {
                key: "reader".into(),
                scope: Scope::SharedMemory
            }
            .message()
            .contains("'shared_memory' scope")
        );
    }

    #[test]
    fn constant_time_lookup_compares_every_key() {
        // The last of many keys is found, and a token equal to none of them matches none,
        // through the same comparison path (digests, subtle's ct_eq, no early exit).
        let mut keys = ApiKeys::default();
        for i in 0..50 {
            keys.add_token(&format!("k{i}"), &format!("token-number-{i:04}-xxxx"))
                .expect("valid");
        }
        assert_eq!(
            keys.find(b"token-number-0049-xxxx").map(|k| &*k.name),
            Some("k49")
        );
        assert_eq!(keys.find(b"token-number-0000-xxxx").map(|k| &*k.name), Some("k0"));
        assert!(keys.find(b"token-number-0050-xxxx").is_none());
        assert!(keys.find(b"").is_none());
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let keys = two_keys();
        let printed = format!("{keys:?}");
        assert!(!printed.contains(TOKEN_A), "{printed}");
        assert!(!printed.contains(&sha256_hex(TOKEN_A)[..16]), "{printed}");
        assert!(
            printed.contains("reader") && printed.contains("<redacted>"),
            "{printed}"
        );
        assert_eq!(format!("{:?}", Secret(TOKEN_A.into())), "<redacted>");
        // Errors about a key name it, never its token.
        let e = ApiKeys::parse(
            "[[keys]]\nname = \"x\"\ntoken = \"short\"\nscopes = [\"all\"]\n",
            "f",
        )
        .expect_err("short token")
        .to_string();
        assert!(e.contains("shorter than 16") && !e.contains("short\""), "{e}");
    }

    #[test]
    fn bad_key_files_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("keys = 3", "invalid type"),
            (
                "[[keys]]\nname = \"a\"\nscopes = [\"infer\"]\n",
                "needs 'token' or 'token_sha256'",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\ntoken_sha256 = \"00\"\nscopes = [\"infer\"]\n",
                "both",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken_sha256 = \"abc\"\nscopes = [\"infer\"]\n",
                "64 hexadecimal",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken_sha256 = \"zz00000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"infer\"]\n",
                "64 hexadecimal",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\nscopes = []\n",
                "no scopes",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\nscopes = [\"admin\"]\n",
                "unknown scope 'admin'",
            ),
            (
                "[[keys]]\nname = \" \"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\nscopes = [\"all\"]\n",
                "'name' is empty",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken = \"tok aaaaaaaaaaaaaaaaaaaa\"\nscopes = [\"all\"]\n",
                "printable ASCII",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\nscope = [\"all\"]\n",
                "unknown field `scope`",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\nscopes = [\"all\"]\n\
                 [[keys]]\nname = \"a\"\ntoken = \"tok-bbbbbbbbbbbbbbbbbbbb\"\nscopes = [\"all\"]\n",
                "two keys are named 'a'",
            ),
            (
                "[[keys]]\nname = \"a\"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\nscopes = [\"all\"]\n\
                 [[keys]]\nname = \"b\"\ntoken = \"tok-aaaaaaaaaaaaaaaaaaaa\"\nscopes = [\"all\"]\n",
                "same token",
            ),
            ("[[keys]\n", "invalid"),
        ];
        for (text, expected) in cases {
            let e = ApiKeys::parse(text, "keys.toml").expect_err(text).to_string();
            assert!(e.contains("keys.toml") && e.contains(expected), "{text:?}: {e}");
        }
        let e = ApiKeys::from_file(Path::new("/nonexistent/keys.toml")).expect_err("missing");
        assert!(
            e.to_string()
                .contains("cannot read the API key file /nonexistent/keys.toml"),
            "{e}"
        );
        // A file without keys would silently leave everything open: refused.
        let e = ApiKeys::parse("", "f").expect_err("empty").to_string();
        assert!(e.contains("no [[keys]]"), "{e}");
    }
}
