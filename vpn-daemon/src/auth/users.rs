//! The local user database: a TOML file of users with password hashes and
//! an optional group-policy name, managed with `vpnctl user`.
//!
//! ```toml
//! [[user]]
//! name = "alice"
//! password_hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! group_policy = "engineering"   # optional
//! ```
//!
//! New passwords are hashed with argon2id. Hashes imported from ocserv's
//! `ocpasswd` files or `/etc/shadow` (`vpnctl user import`) keep their
//! crypt SHA-512 (`$6$`) or SHA-256 (`$5$`) form and are checked as such;
//! `vpnctl user passwd` moves a user to argon2id.
//!
//! The daemon re-reads the file when its modification time changes, so
//! `vpnctl user add` takes effect at the next login. A file that no longer
//! parses is reported and the last good copy stays in use.

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use argon2::{
    Argon2, PasswordHash, PasswordHasher,
    password_hash::{SaltString, rand_core::OsRng},
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_policy: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    #[serde(default, rename = "user")]
    pub users: Vec<User>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("cannot read user database {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("user database {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write user database {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("user '{0}' already exists (use `vpnctl user passwd` to change the password)")]
    Exists(String),
    #[error("no user '{0}' in the database")]
    NotFound(String),
    #[error("'{0}' is not a valid user name: use 1 to 64 letters, digits, '.', '-', '_' or '@'")]
    BadName(String),
    #[error("the password is empty")]
    EmptyPassword,
    #[error(
        "user '{user}': the password hash '{prefix}...' is of a kind vpnd cannot check: \
         use argon2 ($argon2id$, $argon2i$, $argon2d$), crypt SHA-512 ($6$) or crypt SHA-256 ($5$)"
    )]
    UnsupportedHash { user: String, prefix: String },
    #[error("user '{user}': the {scheme:?} password hash is malformed")]
    MalformedHash { user: String, scheme: HashScheme },
}

/// The password hash schemes vpnd checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashScheme {
    /// PHC strings `$argon2id$...` (what vpnd writes), `$argon2i$`, `$argon2d$`.
    Argon2,
    /// crypt(3) SHA-512, `$6$[rounds=N$]salt$hash`: ocpasswd's and Debian's
    /// shadow default before yescrypt.
    CryptSha512,
    /// crypt(3) SHA-256, `$5$...`.
    CryptSha256,
}

impl HashScheme {
    /// The scheme of a stored hash, if vpnd can check it (the string's
    /// syntax is checked when it is used).
    pub fn of(hash: &str) -> Option<HashScheme> {
        if hash.starts_with("$argon2") {
            Some(HashScheme::Argon2)
        } else if hash.starts_with("$6$") {
            Some(HashScheme::CryptSha512)
        } else if hash.starts_with("$5$") {
            Some(HashScheme::CryptSha256)
        } else {
            None
        }
    }
}

/// Checks that `hash` is of a scheme vpnd can verify, and well formed.
pub fn validate_hash(user: &str, hash: &str) -> Result<HashScheme, UserError> {
    let scheme = HashScheme::of(hash).ok_or_else(|| UserError::UnsupportedHash {
        user: user.to_owned(),
        prefix: hash.chars().take(8).collect(),
    })?;
    let ok = match scheme {
        HashScheme::Argon2 => PasswordHash::new(hash).is_ok(),
        HashScheme::CryptSha512 => crypt_well_formed(hash, 86),
        HashScheme::CryptSha256 => crypt_well_formed(hash, 43),
    };
    if ok {
        Ok(scheme)
    } else {
        Err(UserError::MalformedHash {
            user: user.to_owned(),
            scheme,
        })
    }
}

/// `$N$[rounds=R$]salt$hash` with a salt of 16 characters at most (more
/// are ignored by crypt(3), refused here), rounds from 1,000 to
/// 999,999,999 and a hash of `len` characters of crypt's alphabet.
fn crypt_well_formed(hash: &str, len: usize) -> bool {
    let alphabet = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    };
    let mut parts = hash.split('$').skip(2);
    let (Some(mut salt), Some(mut digest)) = (parts.next(), parts.next()) else {
        return false;
    };
    let mut rest = parts.next();
    if let Some(r) = salt.strip_prefix("rounds=") {
        if !r
            .parse::<u32>()
            .is_ok_and(|r| (1_000..=999_999_999).contains(&r))
        {
            return false;
        }
        let Some(d) = rest else { return false };
        (salt, digest) = (digest, d);
        rest = parts.next();
    }
    rest.is_none()
        && salt.len() <= 16
        && !salt.is_empty()
        && alphabet(salt)
        && digest.len() == len
        && alphabet(digest)
}

/// Checks a user name: what we accept also keeps logs and events unambiguous.
pub fn validate_name(name: &str) -> Result<(), UserError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(UserError::BadName(name.to_owned()))
    }
}

/// Hashes a password with argon2id and a random salt (PHC string format).
pub fn hash_password(password: &str) -> Result<String, UserError> {
    if password.is_empty() {
        return Err(UserError::EmptyPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters cannot fail")
        .to_string())
}

/// Checks a password against a stored hash (argon2 PHC string or crypt
/// SHA-512/SHA-256). Malformed and unknown hashes never match.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match HashScheme::of(hash) {
        Some(HashScheme::Argon2) => verify_argon2(password, hash),
        // Both compare in constant time (subtle). The form is checked
        // first: sha-crypt 0.5 panics on a SHA-256 hash of the wrong length.
        Some(HashScheme::CryptSha512) => {
            crypt_well_formed(hash, 86) && sha_crypt::sha512_check(password, hash).is_ok()
        }
        Some(HashScheme::CryptSha256) => {
            crypt_well_formed(hash, 43) && sha_crypt::sha256_check(password, hash).is_ok()
        }
        None => false,
    }
}

/// argon2's working memory (19 MiB at vpnd's parameters), kept between
/// verifications: taken afresh it costs a page fault per 4 KiB, since vpnd
/// maps every allocation over 256 KiB anew (`bin/vpnd.rs`), which was a
/// third of a login's time. As many are kept as checks ran at once (the
/// verifier bounds that), up to 64 MiB each; `release_argon2_memory` lets
/// them go when logins stop.
static ARGON2_MEMORY: Mutex<Vec<Vec<argon2::Block>>> = Mutex::new(Vec::new());
const ARGON2_KEEP_BLOCKS: usize = 64 * 1024;

/// Lets go of the memory kept for argon2 (the verifier calls it after a
/// quiet spell).
pub fn release_argon2_memory() {
    ARGON2_MEMORY.lock().clear();
}

/// `argon2`'s own verification (the parameters, salt and algorithm of
/// the PHC string, a constant-time comparison of the output), on kept
/// memory.
fn verify_argon2(password: &str, hash: &str) -> bool {
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let (Ok(params), Ok(algorithm)) = (
        argon2::Params::try_from(&h),
        argon2::Algorithm::try_from(h.algorithm),
    ) else {
        return false;
    };
    let Ok(version) = h.version.map(argon2::Version::try_from).transpose() else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let n = params.block_count();
    let mut blocks = ARGON2_MEMORY.lock().pop().unwrap_or_default();
    if blocks.len() < n {
        blocks.resize(n, argon2::Block::default());
    }
    let mut out = [0u8; argon2::password_hash::Output::MAX_LENGTH];
    let out = &mut out[..expected.len()];
    let ok = Argon2::new(algorithm, version.unwrap_or_default(), params)
        .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut blocks[..n])
        .is_ok()
        // Output compares in constant time.
        && argon2::password_hash::Output::new(out).is_ok_and(|o| o == expected);
    if blocks.len() <= ARGON2_KEEP_BLOCKS {
        ARGON2_MEMORY.lock().push(blocks);
    }
    ok
}

impl UserFile {
    /// Reads the file; a missing file is an empty database.
    pub fn read(path: &Path) -> Result<Self, UserError> {
        let text = match crate::files::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(UserError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let f: UserFile = toml::from_str(&text).map_err(|e| UserError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        for u in &f.users {
            validate_name(&u.name).map_err(|e| UserError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        }
        Ok(f)
    }

    /// Writes the file atomically and durably: a new temporary file of
    /// its own (random name, created exclusively, mode 0600 whatever the
    /// umask), synced, renamed over the file, and the directory synced.
    pub fn write(&self, path: &Path) -> Result<(), UserError> {
        use std::{
            io::Write,
            os::unix::fs::{OpenOptionsExt, PermissionsExt},
        };
        let werr = |source| UserError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(werr)?;
        let mut suffix = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut suffix);
        let tmp = path.with_extension(format!("toml.{}.tmp", hex::encode(suffix)));
        let text = toml::to_string(self).expect("user file serialises");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        let written = f
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| f.write_all(b"# vpn-gateway local users; manage with `vpnctl user`.\n"))
            .and_then(|()| f.write_all(text.as_bytes()))
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(werr)
    }

    /// Reads the file at `path`, changes it with `change` and writes it
    /// back, holding an exclusive lock (`flock` on `PATH.lock`) throughout,
    /// so two `vpnctl` runs at once cannot lose one another's change.
    pub fn edit<T>(
        path: &Path,
        change: impl FnOnce(&mut UserFile) -> Result<T, UserError>,
    ) -> Result<T, UserError> {
        use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
        let werr = |source| UserError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(werr)?;
        }
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path.with_extension("toml.lock"))
            .map_err(werr)?;
        // SAFETY: flock on a file we hold open; released when it closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(werr(std::io::Error::last_os_error()));
        }
        let mut db = UserFile::read(path)?;
        let out = change(&mut db)?;
        db.write(path)?;
        Ok(out)
    }

    pub fn find(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn add(
        &mut self,
        name: &str,
        password: &str,
        group_policy: Option<String>,
    ) -> Result<(), UserError> {
        validate_name(name)?;
        if self.find(name).is_some() {
            return Err(UserError::Exists(name.to_owned()));
        }
        self.users.push(User {
            name: name.to_owned(),
            password_hash: hash_password(password)?,
            group_policy,
        });
        Ok(())
    }

    /// Adds a user with an existing hash (an import), checked to be of a
    /// scheme vpnd can verify.
    pub fn add_hashed(
        &mut self,
        name: &str,
        hash: &str,
        group_policy: Option<String>,
    ) -> Result<(), UserError> {
        validate_name(name)?;
        validate_hash(name, hash)?;
        if self.find(name).is_some() {
            return Err(UserError::Exists(name.to_owned()));
        }
        self.users.push(User {
            name: name.to_owned(),
            password_hash: hash.to_owned(),
            group_policy,
        });
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<(), UserError> {
        let before = self.users.len();
        self.users.retain(|u| u.name != name);
        if self.users.len() == before {
            return Err(UserError::NotFound(name.to_owned()));
        }
        Ok(())
    }

    pub fn set_password(&mut self, name: &str, password: &str) -> Result<(), UserError> {
        let hash = hash_password(password)?;
        let u = self
            .users
            .iter_mut()
            .find(|u| u.name == name)
            .ok_or_else(|| UserError::NotFound(name.to_owned()))?;
        u.password_hash = hash;
        Ok(())
    }
}

/// What changed for users from one version of the file to the next.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserChanges {
    /// Users no longer in the file.
    pub removed: Vec<String>,
    /// Users whose password hash changed.
    pub password_changed: Vec<String>,
    /// Users whose own group policy changed.
    pub policy_changed: Vec<String>,
    /// When the newest version of the file was read. A session that
    /// started later logged in with it (a user who changed their password
    /// and logged in again at once keeps that new session). Of changes
    /// read apart, the last counts: a session in between ends too.
    pub read_at: Option<std::time::Instant>,
}

impl UserChanges {
    /// The changes from `old` to `new`, added to these.
    fn add(&mut self, old: &UserFile, new: &UserFile) {
        self.read_at = Some(std::time::Instant::now());
        for u in &old.users {
            let name = || u.name.clone();
            match new.find(&u.name) {
                None => self.removed.push(name()),
                Some(n) => {
                    if n.password_hash != u.password_hash {
                        self.password_changed.push(name());
                    }
                    if n.group_policy != u.group_policy {
                        self.policy_changed.push(name());
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.removed.is_empty()
            && self.password_changed.is_empty()
            && self.policy_changed.is_empty()
    }
}

/// The daemon's view of the database: reloaded when the file changes.
pub struct UserDb {
    path: PathBuf,
    cached: Mutex<Cached>,
}

struct Cached {
    mtime: Option<SystemTime>,
    file: std::sync::Arc<UserFile>,
    /// Changes since the last [`UserDb::take_changes`].
    changes: UserChanges,
}

/// The outcome of a password check.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthResult {
    Ok { group_policy: Option<String> },
    UnknownUser,
    BadPassword,
}

impl UserDb {
    pub fn open(path: PathBuf) -> Result<Self, UserError> {
        let mtime = crate::files::modified(&path).ok();
        let f = UserFile::read(&path)?;
        Ok(UserDb {
            path,
            cached: Mutex::new(Cached {
                mtime,
                file: std::sync::Arc::new(f),
                changes: UserChanges::default(),
            }),
        })
    }

    /// The current users, re-read if the file changed (what changed is
    /// kept for [`Self::take_changes`]). A broken file keeps the previous
    /// copy and logs why.
    fn current(&self) -> std::sync::Arc<UserFile> {
        let mtime = crate::files::modified(&self.path).ok();
        let mut c = self.cached.lock();
        if c.mtime != mtime {
            c.mtime = mtime;
            match UserFile::read(&self.path) {
                Ok(f) => {
                    let old = std::mem::replace(&mut c.file, std::sync::Arc::new(f));
                    let new = c.file.clone();
                    c.changes.add(&old, &new);
                }
                Err(e) => tracing::error!("{e}; keeping the previous user list"),
            }
        }
        c.file.clone()
    }

    /// What changed for users since the last call (the file is re-read if
    /// it changed): the daemon ends the sessions of users removed or whose
    /// password changed, and re-resolves policies.
    pub fn take_changes(&self) -> UserChanges {
        self.current();
        std::mem::take(&mut self.cached.lock().changes)
    }

    /// A user's own group policy from the current file: `None` if the user
    /// is not in the database (any more).
    pub fn policy_of(&self, name: &str) -> Option<Option<String>> {
        self.current().find(name).map(|u| u.group_policy.clone())
    }

    /// A fingerprint of a user's password hash (SHA-256 of it, hex), to
    /// tell after a restart whether the password changed meanwhile
    /// (`session.persist`): `None` if the user is not in the database.
    pub fn credential_tag(&self, name: &str) -> Option<String> {
        use sha2::Digest as _;
        self.current()
            .find(name)
            .map(|u| hex::encode(sha2::Sha256::digest(u.password_hash.as_bytes())))
    }

    /// Checks a user's password. Slow by design (argon2): call it from a
    /// blocking thread. Unknown users cost the same as known ones, so timing
    /// does not reveal which names exist.
    pub fn authenticate(&self, name: &str, password: &str) -> AuthResult {
        let users = self.current();
        match users.find(name) {
            Some(u) => {
                if verify_password(password, &u.password_hash) {
                    AuthResult::Ok {
                        group_policy: u.group_policy.clone(),
                    }
                } else {
                    AuthResult::BadPassword
                }
            }
            None => {
                // Equalise timing with a real verification, of the scheme
                // the file's users have (imported crypt hashes are several
                // times faster than argon2).
                static ARGON2: std::sync::OnceLock<String> = std::sync::OnceLock::new();
                const SHA512: &str = "$6$bFqHv7OT0rEi3MHN$oSP/x9dM4bmO6E.jPCQTwDQdOzIjU0wsQzY1YRhZG/3YC7KXIfAEIgOYoD4EUlLC1Y8wnyeGkXZ./T1U1hhca0";
                const SHA256: &str =
                    "$5$bFqHv7OT0rEi3MHN$RpcNq0fWJ6Vao2nT4cMdMSW5Zvj82Tg1TG17fBE0aM0";
                let h = match users
                    .users
                    .first()
                    .and_then(|u| HashScheme::of(&u.password_hash))
                {
                    Some(HashScheme::CryptSha512) => SHA512,
                    Some(HashScheme::CryptSha256) => SHA256,
                    _ => ARGON2.get_or_init(|| hash_password("x").unwrap()),
                };
                let _ = verify_password(password, h);
                AuthResult::UnknownUser
            }
        }
    }
}

/// One user read from an ocpasswd or shadow file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub name: String,
    /// ocpasswd's group ("*" or empty: none); shadow files have none.
    pub group: Option<String>,
    pub hash: String,
}

/// Reads an ocserv `ocpasswd` file (`name:group:hash`, one per line) or an
/// `/etc/shadow` file (`name:hash:...` with 9 fields). Each line gives a
/// user or says, with its line number, why it cannot be imported.
pub fn parse_password_file(text: &str) -> Vec<Result<Imported, String>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, line)| {
            let n = i + 1;
            let f: Vec<&str> = line.split(':').collect();
            let (name, group, hash) = match f.len() {
                3 => (f[0], Some(f[1]), f[2]),
                9 => (f[0], None, f[1]),
                k => {
                    return Err(format!(
                        "line {n}: {k} fields; expected ocpasswd's 3 (name:group:hash) or shadow's 9"
                    ));
                }
            };
            validate_name(name).map_err(|e| format!("line {n}: {e}"))?;
            if hash.starts_with('!') || hash.starts_with('*') || hash.is_empty() {
                return Err(format!("line {n}: user '{name}' is locked or has no password"));
            }
            validate_hash(name, hash).map_err(|e| format!("line {n}: {e}"))?;
            Ok(Imported {
                name: name.to_owned(),
                group: group
                    .filter(|g| !g.is_empty() && *g != "*")
                    .map(str::to_owned),
                hash: hash.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by `openssl passwd -6 -salt bFqHv7OT0rEi3MHN x` and `-5`, the
    /// same crypt(3) as glibc's and ocpasswd's.
    const X_SHA512: &str = "$6$bFqHv7OT0rEi3MHN$oSP/x9dM4bmO6E.jPCQTwDQdOzIjU0wsQzY1YRhZG/3YC7KXIfAEIgOYoD4EUlLC1Y8wnyeGkXZ./T1U1hhca0";
    const X_SHA256: &str = "$5$bFqHv7OT0rEi3MHN$RpcNq0fWJ6Vao2nT4cMdMSW5Zvj82Tg1TG17fBE0aM0";

    #[test]
    fn crypt_hashes_from_ocpasswd_and_shadow_verify() {
        for h in [X_SHA512, X_SHA256] {
            assert!(verify_password("x", h), "{h}");
            assert!(!verify_password("y", h), "{h}");
            assert!(!verify_password("x", &h[..h.len() - 1]), "{h}");
        }
        // With explicit rounds (`openssl passwd -6 -salt salt` cannot, so
        // the Drepper test vector): rounds=10000, "Hello world!".
        let v = "$6$rounds=10000$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.";
        assert!(verify_password("Hello world!", v));
        // Malformed ones never match and never panic (sha-crypt 0.5 would
        // on a SHA-256 digest of the wrong length).
        for bad in [
            "$5$bFqHv7OT0rEi3MHN$RpcNq0",
            "$5$bFqHv7OT0rEi3MHN$RpcNq0fWJ6Vao2nT4cMdMSW5Zvj82Tg1TG17fBE0aM0x",
            "$6$rounds=10$saltstringsaltst$OW1/O6BYHV6BcXZu8QVeXbDWra3Oeqh0sbHbbMCVNSnCM/UrjmM0Dp8vOuZeHBy/YTBmSK6H9qs/y3RnOaw5v.",
            "$6$$oSP/x9dM4bmO6E.jPCQTwDQdOzIjU0wsQzY1YRhZG/3YC7KXIfAEIgOYoD4EUlLC1Y8wnyeGkXZ./T1U1hhca0",
            "$6$bFqHv7OT0rEi3MHN$oSP/x9dM4bmO6E.jPCQTwDQdOzIjU0wsQzY1YRhZG/3YC7KXIfAEIgOYoD4EUlLC1Y8wnyeGkXZ./T1U1hhca0$",
            "$5$a b$RpcNq0fWJ6Vao2nT4cMdMSW5Zvj82Tg1TG17fBE0aM0",
        ] {
            assert!(!verify_password("x", bad), "{bad}");
            assert!(validate_hash("u", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_files_import_with_a_reason_for_each_refusal() {
        let text = format!(
            "carol:*:{X_SHA512}\ndave:eng:{X_SHA256}\n# comment\n\nerin:*:!{X_SHA512}\n\
             frank:x:$y$j9T$abc$def\nbad name:*:{X_SHA512}\ngrace:{X_SHA512}:19000:0:99999:7:::\nshort:x\n"
        );
        let r = parse_password_file(&text);
        assert_eq!(
            r[0],
            Ok(Imported {
                name: "carol".into(),
                group: None,
                hash: X_SHA512.into()
            })
        );
        assert_eq!(r[1].as_ref().unwrap().group.as_deref(), Some("eng"));
        assert!(
            r[2].as_ref()
                .unwrap_err()
                .contains("line 5: user 'erin' is locked")
        );
        let yescrypt = r[3].as_ref().unwrap_err();
        assert!(
            yescrypt.contains("line 6")
                && yescrypt.contains("'$y$j9T$a...'")
                && yescrypt.contains("($6$)"),
            "{yescrypt}"
        );
        assert!(r[4].as_ref().unwrap_err().contains("line 7: 'bad name'"));
        assert_eq!(r[5].as_ref().unwrap().hash, X_SHA512);
        assert!(r[6].as_ref().unwrap_err().contains("line 9: 2 fields"));
        assert_eq!(r.len(), 7);
    }

    #[test]
    fn hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cre", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }

    /// Verification on kept memory agrees with argon2's own verifier for
    /// each variant and other parameters.
    #[test]
    fn argon2_on_kept_memory_agrees_with_argon2s_verifier() {
        use argon2::{Algorithm, Params, PasswordVerifier as _, Version};
        let salt = SaltString::generate(&mut OsRng);
        for (alg, m, t, len) in [
            (Algorithm::Argon2id, 19 * 1024, 2, 32),
            (Algorithm::Argon2i, 64, 3, 16),
            (Algorithm::Argon2d, 256, 1, 64),
        ] {
            let params = Params::new(m, t, 1, Some(len)).unwrap();
            let a = Argon2::new(alg, Version::V0x13, params);
            let h = a.hash_password(b"pw", &salt).unwrap().to_string();
            for guess in ["pw", "pW", ""] {
                let theirs = Argon2::default()
                    .verify_password(guess.as_bytes(), &PasswordHash::new(&h).unwrap())
                    .is_ok();
                assert_eq!(verify_argon2(guess, &h), theirs, "{h} {guess:?}");
                assert_eq!(theirs, guess == "pw");
            }
        }
        // A hash with its output cut short or its salt missing never matches.
        let h = hash_password("pw").unwrap();
        let (head, _) = h.rsplit_once('$').unwrap();
        assert!(!verify_password("pw", head));
        assert!(!verify_password("pw", &format!("{head}$AAAA")));
    }

    /// Audit L3: `vpnctl user` runs at once each read, change and write
    /// the file; without a lock one's change was lost.
    #[test]
    fn concurrent_edits_lose_nothing_and_the_file_stays_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("vpn-users-lock-{}", std::process::id()));
        let path = dir.join("users.toml");
        UserFile::default().write(&path).unwrap();
        std::thread::scope(|s| {
            for i in 0..6 {
                let path = &path;
                s.spawn(move || {
                    UserFile::edit(path, |db| db.add(&format!("user{i}"), "pw", None)).unwrap()
                });
            }
        });
        let db = UserFile::read(&path).unwrap();
        assert_eq!(db.users.len(), 6, "{:?}", db.users);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_daemon_learns_who_was_removed_or_got_a_new_password() {
        let dir = std::env::temp_dir().join(format!("vpn-users-ch-{}", std::process::id()));
        let path = dir.join("users.toml");
        let mut f = UserFile::default();
        for n in ["alice", "bob", "carol"] {
            f.add(n, "pw", None).unwrap();
        }
        f.write(&path).unwrap();
        let db = UserDb::open(path.clone()).unwrap();
        assert!(db.take_changes().is_empty());
        f.set_password("alice", "new").unwrap();
        f.remove("bob").unwrap();
        f.users[1].group_policy = Some("eng".into());
        std::thread::sleep(std::time::Duration::from_millis(20));
        f.write(&path).unwrap();
        // A login reading the file first does not lose the changes.
        assert_eq!(
            db.authenticate("carol", "pw"),
            AuthResult::Ok {
                group_policy: Some("eng".into())
            }
        );
        let before = std::time::Instant::now();
        let changes = db.take_changes();
        assert!(changes.read_at.is_some_and(|t| t <= before), "{changes:?}");
        assert_eq!(
            changes,
            UserChanges {
                removed: vec!["bob".into()],
                password_changed: vec!["alice".into()],
                policy_changed: vec!["carol".into()],
                read_at: changes.read_at,
            }
        );
        assert!(db.take_changes().is_empty(), "taken once");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn add_remove_passwd_roundtrip_through_file() {
        let dir = std::env::temp_dir().join(format!("vpn-users-{}", std::process::id()));
        let path = dir.join("users.toml");
        let mut f = UserFile::default();
        f.add("alice", "pw1", Some("eng".into())).unwrap();
        assert!(matches!(
            f.add("alice", "x", None),
            Err(UserError::Exists(_))
        ));
        assert!(matches!(
            f.add("bad name", "x", None),
            Err(UserError::BadName(_))
        ));
        f.write(&path).unwrap();
        let db = UserDb::open(path.clone()).unwrap();
        assert_eq!(
            db.authenticate("alice", "pw1"),
            AuthResult::Ok {
                group_policy: Some("eng".into())
            }
        );
        assert_eq!(db.authenticate("alice", "pw2"), AuthResult::BadPassword);
        assert_eq!(db.authenticate("bob", "pw1"), AuthResult::UnknownUser);

        let mut f = UserFile::read(&path).unwrap();
        f.set_password("alice", "pw2").unwrap();
        f.remove("nobody").unwrap_err();
        // Make sure the mtime differs from the first write.
        std::thread::sleep(std::time::Duration::from_millis(20));
        f.write(&path).unwrap();
        assert!(matches!(
            db.authenticate("alice", "pw2"),
            AuthResult::Ok { .. }
        ));

        // A broken file keeps the last good users.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "[[user]]\nname = \n").unwrap();
        assert!(matches!(
            db.authenticate("alice", "pw2"),
            AuthResult::Ok { .. }
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
