//! The login flow of the aggregate-auth exchange, without I/O: a client's
//! `init` and `auth-reply` go in with the time, and a [`Step`] comes out
//! (show the form, check this password, ask for a second factor, refused,
//! authenticated), with the events to log. The caller runs the slow
//! password check (argon2 locally, or a RADIUS exchange) and creates the
//! session; the rules (one success per login, the failure limit,
//! lock-outs, expiry, challenges) are all here and unit-tested in memory.
//!
//! ```text
//!   init ──> Form{handle} ──auth-reply──> Verify ──Accept──> Authenticated
//!                 ^                         │  ^
//!                 │                         │  └─answer── Challenge{prompt}
//!                 │                         ├──Challenge──────┘
//!                 └── Form{error} <── wrong / unavailable (TooManyFailures at the limit)
//! ```

use std::{net::IpAddr, time::Instant};

use crate::{
    auth::{
        Grant,
        admission::{Challenge, Lockout, LoginGuard, LoginRefused},
        users::{AuthResult, validate_name},
    },
    config::{AuthConfig, GroupAuth, GroupConfig, Limits},
    proto::client_string,
};

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Show the login form of login `handle` for `group`, with an error if
    /// the last try failed.
    Form {
        handle: String,
        group: String,
        error: Option<String>,
    },
    /// Check `password` for `user` (slow: off the async runtime), then call
    /// [`LoginFlow::verified`] with the result. `state` is set when the
    /// password answers a challenge (send it back to the server).
    Verify {
        handle: String,
        group: String,
        user: String,
        password: String,
        state: Option<Vec<u8>>,
        /// Which check: the group's method, or its second factor.
        factor: Factor,
    },
    /// Ask for a second factor: show `prompt` and one hidden input.
    Challenge {
        handle: String,
        group: String,
        prompt: String,
        error: Option<String>,
    },
    /// Refused before any password check.
    Refused(LoginRefused),
    /// The login reached `auth.max_failures`: 401 and close.
    TooManyFailures,
    /// A certificate-only group without a usable client certificate:
    /// `message` and close.
    CertificateRequired { message: String },
    /// The password was right: create `user`'s session in `group` with
    /// what the authentication source granted.
    Authenticated {
        group: String,
        user: String,
        grant: Grant,
    },
}

/// Which of a group's checks a password goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// The group's method (`[[group]] method`, else `auth.method`).
    First,
    /// Its `second_factor`, after the first passed.
    Second,
}

/// The prompt of a group's second factor.
pub const SECOND_FACTOR_PROMPT: &str = "Enter your one-time code";

/// What checking a password found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept(Grant),
    UnknownUser,
    WrongPassword,
    /// The authentication server said no (RADIUS Access-Reject), with the
    /// message it gave for the user, if any.
    Rejected {
        message: Option<String>,
    },
    /// The server wants another factor: show `prompt`, send `state` back
    /// with the answer.
    Challenge {
        prompt: String,
        state: Vec<u8>,
    },
    /// Nobody could check (no RADIUS server answered): not the user's
    /// fault, not counted as a failure.
    Unavailable,
}

impl From<AuthResult> for Verdict {
    fn from(r: AuthResult) -> Self {
        match r {
            AuthResult::Ok { group_policy } => Verdict::Accept(Grant {
                own_policy: group_policy,
                ..Grant::default()
            }),
            AuthResult::UnknownUser => Verdict::UnknownUser,
            AuthResult::BadPassword => Verdict::WrongPassword,
        }
    }
}

/// Something the flow wants in the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginEvent {
    /// A failed login: `user` as it may be shown (cut and escaped).
    Failed { user: String, reason: FailReason },
    /// A lock-out began.
    Lockout(Lockout),
}

/// Why a login failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    UnknownUser,
    WrongPassword,
    /// A name no user can have (refused without a password check).
    InvalidName,
    /// The authentication server refused (RADIUS Access-Reject: a wrong
    /// password, a wrong code, or a disabled account).
    Rejected,
    /// The group needs a client certificate and the connection had none.
    NoCertificate,
    /// The client certificate is another user's.
    CertificateMismatch,
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailReason::UnknownUser => "unknown user",
            FailReason::WrongPassword => "wrong password",
            FailReason::InvalidName => "invalid user name",
            FailReason::Rejected => "rejected by the authentication server",
            FailReason::NoCertificate => "no client certificate",
            FailReason::CertificateMismatch => "the client certificate names another user",
        })
    }
}

/// What a client's `init` or `auth-reply` says, as far as the flow cares.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// The login's handle (`aggauth-handle`, or the `webvpncontext` cookie).
    pub handle: Option<String>,
    /// A group the client picked.
    pub group_select: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The answer to a challenge form.
    pub answer: Option<String>,
}

/// Where and when a request comes from, and the handle a new login it
/// starts would get (random, from the caller).
#[derive(Debug, Clone)]
pub struct Ctx {
    pub peer: IpAddr,
    pub now: Instant,
    pub new_handle: String,
    /// The user name of the connection's verified client certificate.
    pub cert_user: Option<String>,
}

/// A password check in flight: what [`Step::Verify`] asked for, without
/// the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checking {
    pub handle: String,
    pub group: String,
    pub user: String,
    pub factor: Factor,
}

/// The form error a login that ended meanwhile gets.
pub const EXPIRED: &str = "your login attempt expired; please log in again";

/// The form error when nobody could check the password.
pub const UNAVAILABLE: &str =
    "the authentication service is unavailable; please try again in a few minutes";

/// The form error after a failed password (no server message).
pub const INVALID: &str = "invalid username or password";

/// The login flow: logins in progress and their failures ([`LoginGuard`]),
/// and the tunnel groups offered.
pub struct LoginFlow {
    guard: LoginGuard,
    /// The `[[group]]`s; never empty, the first is the default.
    groups: Vec<GroupConfig>,
    max_failures: u32,
}

impl LoginFlow {
    /// A flow with `groups` (the default group first; at least one).
    pub fn new(limits: &Limits, auth: &AuthConfig, groups: Vec<GroupConfig>) -> Self {
        assert!(!groups.is_empty(), "validated settings have a group");
        LoginFlow {
            guard: LoginGuard::new(limits, auth),
            groups,
            max_failures: auth.max_failures,
        }
    }

    /// The group `name` names: its name, else its label in any case
    /// (clients send either).
    fn find_group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name).or_else(|| {
            self.groups.iter().find(|g| {
                g.label
                    .as_deref()
                    .is_some_and(|l| l.eq_ignore_ascii_case(name))
            })
        })
    }

    fn default_group(&self) -> String {
        self.groups[0].name.clone()
    }

    /// Logins in progress, sources and users locked out now.
    pub fn counts(&self, now: Instant) -> (usize, usize, usize) {
        self.guard.counts(now)
    }

    /// Starts a login in `group` under the new handle.
    fn start(&mut self, group: String, ctx: Ctx) -> Step {
        if self.find_group(&group).map(|g| g.auth) == Some(GroupAuth::Certificate) {
            return match ctx.cert_user {
                Some(user) if validate_name(&user).is_ok() => Step::Authenticated {
                    group,
                    user,
                    grant: Grant {
                        source: crate::auth::AuthSource::Certificate,
                        ..Grant::default()
                    },
                },
                Some(user) => Step::CertificateRequired {
                    message: format!(
                        "the certificate's name '{}' is not a valid user name",
                        client_string(&user)
                    ),
                },
                None => Step::CertificateRequired {
                    message: format!("the group '{group}' needs a client certificate"),
                },
            };
        }
        let handle = ctx.new_handle;
        match self
            .guard
            .start(handle.clone(), group.clone(), ctx.peer, ctx.now)
        {
            Ok(()) => Step::Form {
                handle,
                group,
                error: None,
            },
            Err(r) => Step::Refused(r),
        }
    }

    /// A fresh form for a client whose login is unknown or over.
    fn expired(&mut self, ctx: Ctx) -> Step {
        match self.start(self.default_group(), ctx) {
            Step::Form { handle, group, .. } => Step::Form {
                handle,
                group,
                error: Some(EXPIRED.into()),
            },
            other => other,
        }
    }

    /// An `init`: a new login, in the group the client picked
    /// (`<group-select>`, else the URL `path`), or the default one.
    pub fn init(&mut self, group_select: Option<&str>, path: &str, ctx: Ctx) -> Step {
        let wanted = group_select.unwrap_or(path.trim_start_matches('/'));
        let group = self
            .find_group(wanted)
            .map_or_else(|| self.default_group(), |g| g.name.clone());
        self.start(group, ctx)
    }

    /// An `auth-reply`. A login that is unknown or over gets a new one.
    /// Failures are counted here; `events` gets what to log.
    pub fn reply(&mut self, r: Reply, ctx: Ctx, events: &mut Vec<LoginEvent>) -> Step {
        let pending = r
            .handle
            .as_deref()
            .and_then(|h| self.guard.get(h, ctx.now))
            .map(|p| (p.group.clone(), p.challenge.clone()));
        let (Some(handle), Some((group, challenge))) = (r.handle, pending) else {
            return self.expired(ctx);
        };
        if let Some(ch) = challenge {
            // The reply answers the challenge; the user is the one who
            // passed the first factor.
            let Some(answer) = r.answer.or(r.password).filter(|a| !a.is_empty()) else {
                return Step::Challenge {
                    handle,
                    group,
                    prompt: ch.prompt,
                    error: Some("enter the code".into()),
                };
            };
            if let Err(refused) = self.guard.may_try(&ch.user, ctx.peer, ctx.now) {
                return Step::Refused(refused);
            }
            let factor = if ch.first.is_some() {
                Factor::Second
            } else {
                Factor::First
            };
            return Step::Verify {
                handle,
                group,
                user: ch.user,
                password: answer,
                state: (!ch.state.is_empty()).then_some(ch.state),
                factor,
            };
        }
        let group = match r.group_select.as_deref() {
            None => group,
            Some(g) => match self.find_group(g) {
                Some(g) => g.name.clone(),
                None => {
                    let error = format!("unknown group '{}'", client_string(g));
                    return Step::Form {
                        handle,
                        group,
                        error: Some(error),
                    };
                }
            },
        };
        let (Some(user), Some(password)) = (r.username, r.password) else {
            return Step::Form {
                handle,
                group,
                error: Some("enter a username and a password".into()),
            };
        };
        if validate_name(&user).is_err() {
            let check = Checking {
                handle,
                group,
                user: client_string(&user),
                factor: Factor::First,
            };
            return self.failed(check, false, FailReason::InvalidName, None, ctx, events);
        }
        if let Some(g) = self.find_group(&group)
            && g.auth == GroupAuth::CertificateAndPassword
        {
            let must_match = g.cert_name_must_match;
            let (reason, message) = match ctx.cert_user.as_deref() {
                None => (
                    FailReason::NoCertificate,
                    format!("the group '{group}' needs a client certificate"),
                ),
                Some(c) if must_match && c != user => (
                    FailReason::CertificateMismatch,
                    "the client certificate is not for this user".to_owned(),
                ),
                Some(_) => (FailReason::WrongPassword, String::new()),
            };
            if reason != FailReason::WrongPassword {
                let check = Checking {
                    handle,
                    group,
                    user: client_string(&user),
                    factor: Factor::First,
                };
                return self.failed(check, false, reason, Some(message), ctx, events);
            }
        }
        if let Err(refused) = self.guard.may_try(&user, ctx.peer, ctx.now) {
            return Step::Refused(refused);
        }
        Step::Verify {
            handle,
            group,
            user,
            password,
            state: None,
            factor: Factor::First,
        }
    }

    pub fn verified(
        &mut self,
        c: Checking,
        verdict: impl Into<Verdict>,
        ctx: Ctx,
        events: &mut Vec<LoginEvent>,
    ) -> Step {
        // What the first factor granted, while the second is checked.
        let first = self
            .guard
            .get(&c.handle, ctx.now)
            .and_then(|p| p.challenge.as_ref())
            .and_then(|ch| ch.first.clone());
        let (reason, message) = match verdict.into() {
            Verdict::Accept(grant) => {
                let second = self.find_group(&c.group).and_then(|g| g.second_factor);
                if c.factor == Factor::First && second.is_some() {
                    let challenge = Challenge {
                        user: c.user,
                        prompt: SECOND_FACTOR_PROMPT.into(),
                        state: Vec::new(),
                        first: Some(grant),
                    };
                    if !self.guard.set_challenge(&c.handle, Some(challenge)) {
                        return self.expired(ctx);
                    }
                    return Step::Challenge {
                        handle: c.handle,
                        group: c.group,
                        prompt: SECOND_FACTOR_PROMPT.into(),
                        error: None,
                    };
                }
                if c.factor == Factor::Second && first.is_none() {
                    // The first factor's grant is gone with the login.
                    return self.expired(ctx);
                }
                if !self.guard.succeeded(&c.handle, &c.user, ctx.peer, ctx.now) {
                    return self.expired(ctx);
                }
                return Step::Authenticated {
                    group: c.group,
                    user: c.user,
                    grant: match first {
                        Some(first) => first.with_second(grant),
                        None => grant,
                    },
                };
            }
            Verdict::Challenge { prompt, state } => {
                let challenge = Challenge {
                    user: c.user,
                    prompt: prompt.clone(),
                    state,
                    first: if c.factor == Factor::Second {
                        first
                    } else {
                        None
                    },
                };
                if !self.guard.set_challenge(&c.handle, Some(challenge)) {
                    return self.expired(ctx);
                }
                return Step::Challenge {
                    handle: c.handle,
                    group: c.group,
                    prompt,
                    error: None,
                };
            }
            Verdict::Unavailable => {
                if !self.guard.set_challenge(&c.handle, None) {
                    return self.expired(ctx);
                }
                return Step::Form {
                    handle: c.handle,
                    group: c.group,
                    error: Some(UNAVAILABLE.into()),
                };
            }
            Verdict::UnknownUser => (FailReason::UnknownUser, None),
            Verdict::WrongPassword => (FailReason::WrongPassword, None),
            Verdict::Rejected { message } => (FailReason::Rejected, message),
        };
        self.failed(c, true, reason, message, ctx, events)
    }

    /// A failed try: counted, and the form again (the username and
    /// password form: a failed challenge starts over) with `message` or
    /// the usual error.
    fn failed(
        &mut self,
        c: Checking,
        counts_for_user: bool,
        reason: FailReason,
        message: Option<String>,
        ctx: Ctx,
        events: &mut Vec<LoginEvent>,
    ) -> Step {
        let user = counts_for_user.then_some(c.user.as_str());
        let f = self.guard.failed(&c.handle, user, ctx.peer, ctx.now);
        self.guard.set_challenge(&c.handle, None);
        events.push(LoginEvent::Failed {
            user: c.user,
            reason,
        });
        events.extend(f.lockouts.into_iter().map(LoginEvent::Lockout));
        match f.login_failures {
            None => self.expired(ctx),
            Some(n) if n >= self.max_failures => Step::TooManyFailures,
            Some(_) => Step::Form {
                handle: c.handle,
                group: c.group,
                error: Some(message.map_or_else(|| INVALID.into(), |m| client_string(&m))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn flow(max_failures: u32) -> LoginFlow {
        LoginFlow::new(
            &Limits {
                lockout_source_failures: 5,
                lockout_user_failures: 0,
                ..Limits::default()
            },
            &AuthConfig {
                max_failures,
                ..AuthConfig::default()
            },
            vec![
                GroupConfig::named("default"),
                GroupConfig {
                    label: Some("Engineering".into()),
                    ..GroupConfig::named("eng")
                },
            ],
        )
    }

    fn ctx(now: Instant, handle: &str) -> Ctx {
        Ctx {
            peer: "198.18.1.2".parse().unwrap(),
            now,
            new_handle: handle.into(),
            cert_user: None,
        }
    }

    fn reply(handle: &str, user: &str, password: &str) -> Reply {
        Reply {
            handle: Some(handle.into()),
            group_select: None,
            username: Some(user.into()),
            password: Some(password.into()),
            answer: None,
        }
    }

    /// An init, then a reply with `password` that the caller checks as
    /// `result`.
    fn attempt(
        f: &mut LoginFlow,
        handle: &str,
        result: AuthResult,
        now: Instant,
        events: &mut Vec<LoginEvent>,
    ) -> Step {
        let step = f.reply(reply(handle, "alice", "pw"), ctx(now, "new"), events);
        let Step::Verify {
            handle,
            group,
            user,
            factor,
            ..
        } = step
        else {
            return step;
        };
        f.verified(
            Checking {
                handle,
                group,
                user,
                factor,
            },
            result,
            ctx(now, "new"),
            events,
        )
    }

    #[test]
    fn init_picks_the_group_by_select_path_or_label_else_the_default() {
        let now = Instant::now();
        let mut f = flow(3);
        let group = |s: Step| match s {
            Step::Form { group, .. } => group,
            other => panic!("{other:?}"),
        };
        assert_eq!(group(f.init(None, "/", ctx(now, "h1"))), "default");
        assert_eq!(group(f.init(None, "/eng", ctx(now, "h2"))), "eng");
        assert_eq!(
            group(f.init(Some("Engineering"), "/", ctx(now, "h3"))),
            "eng"
        );
        assert_eq!(
            group(f.init(Some("nope"), "/eng", ctx(now, "h4"))),
            "default"
        );
        assert_eq!(
            group(f.init(Some("engineering"), "/", ctx(now, "h5"))),
            "eng"
        );
    }

    #[test]
    fn third_bad_password_locks_the_login_and_a_right_one_succeeds_once() {
        let now = Instant::now();
        let mut f = flow(3);
        let mut ev = Vec::new();
        f.init(None, "/", ctx(now, "h"));
        for _ in 0..2 {
            assert!(matches!(
                attempt(&mut f, "h", AuthResult::BadPassword, now, &mut ev),
                Step::Form { error: Some(e), .. } if e == "invalid username or password"
            ));
        }
        assert_eq!(
            attempt(&mut f, "h", AuthResult::BadPassword, now, &mut ev),
            Step::TooManyFailures
        );
        assert_eq!(ev.len(), 3);
        assert!(matches!(
            &ev[0],
            LoginEvent::Failed { user, reason: FailReason::WrongPassword } if user == "alice"
        ));
        // The login is over: a reply on it starts a new one.
        assert!(matches!(
            attempt(&mut f, "h", AuthResult::Ok { group_policy: None }, now, &mut ev),
            Step::Form { handle, error: Some(e), .. } if handle == "new" && e == EXPIRED
        ));
        f.init(None, "/", ctx(now, "k"));
        assert_eq!(
            attempt(
                &mut f,
                "k",
                AuthResult::Ok {
                    group_policy: Some("p".into())
                },
                now,
                &mut ev
            ),
            Step::Authenticated {
                group: "default".into(),
                user: "alice".into(),
                grant: Grant {
                    own_policy: Some("p".into()),
                    ..Grant::default()
                }
            }
        );
        // Once: the handle is used up.
        assert!(matches!(
            attempt(&mut f, "k", AuthResult::Ok { group_policy: None }, now, &mut ev),
            Step::Form { error: Some(e), .. } if e == EXPIRED
        ));
    }

    /// Audit C2, in memory: two replies on one login verify at once; the
    /// first fails at the limit and ends the login; the second, right or
    /// wrong, finds it gone.
    #[test]
    fn a_login_that_ends_during_a_password_check_is_expired_for_the_other() {
        let now = Instant::now();
        let mut f = flow(1);
        let mut ev = Vec::new();
        f.init(None, "/", ctx(now, "h"));
        let a = f.reply(reply("h", "alice", "x"), ctx(now, "n1"), &mut ev);
        let b = f.reply(reply("h", "alice", "pw"), ctx(now, "n2"), &mut ev);
        let check = |s: Step| match s {
            Step::Verify {
                handle,
                group,
                user,
                factor,
                ..
            } => Checking {
                handle,
                group,
                user,
                factor,
            },
            other => panic!("{other:?}"),
        };
        let (a, b) = (check(a), check(b));
        assert_eq!(
            f.verified(a, AuthResult::BadPassword, ctx(now, "n3"), &mut ev),
            Step::TooManyFailures
        );
        assert!(matches!(
            f.verified(b, AuthResult::Ok { group_policy: None }, ctx(now, "n4"), &mut ev),
            Step::Form { handle, error: Some(e), .. } if handle == "n4" && e == EXPIRED
        ));
    }

    #[test]
    fn a_login_expires_after_the_auth_timeout() {
        let now = Instant::now();
        let mut f = flow(3);
        f.init(None, "/", ctx(now, "h"));
        let later = now + Duration::from_secs(AuthConfig::default().timeout_secs);
        let step = f.reply(
            reply("h", "alice", "pw"),
            ctx(later, "fresh"),
            &mut Vec::new(),
        );
        assert!(matches!(
            step,
            Step::Form { handle, error: Some(e), .. } if handle == "fresh" && e == EXPIRED
        ));
    }

    #[test]
    fn replies_without_credentials_or_with_bad_names_or_groups_get_the_form() {
        let now = Instant::now();
        let mut f = flow(3);
        let mut ev = Vec::new();
        f.init(None, "/", ctx(now, "h"));
        let empty = Reply {
            handle: Some("h".into()),
            ..Reply::default()
        };
        assert!(matches!(
            f.reply(empty, ctx(now, "n"), &mut ev),
            Step::Form { error: Some(e), .. } if e.contains("enter a username")
        ));
        let mut bad_group = reply("h", "alice", "pw");
        bad_group.group_select = Some("x\n".repeat(50));
        assert!(matches!(
            f.reply(bad_group, ctx(now, "n"), &mut ev),
            Step::Form { error: Some(e), .. } if e.starts_with("unknown group 'x\\n") && e.len() < 200
        ));
        // A name no user can have: a failure without a password check,
        // logged cut and escaped.
        let long = "a\u{1b}".repeat(1000);
        assert!(matches!(
            f.reply(reply("h", &long, "pw"), ctx(now, "n"), &mut ev),
            Step::Form { error: Some(_), .. }
        ));
        assert!(matches!(
            &ev[..],
            [LoginEvent::Failed { user, reason: FailReason::InvalidName }]
                if *user == client_string(&long) && user.len() < 1000
        ));
    }

    #[test]
    fn a_source_past_its_failures_is_refused_before_any_password_check() {
        let now = Instant::now();
        let mut f = flow(100);
        let mut ev = Vec::new();
        f.init(None, "/", ctx(now, "h"));
        for _ in 0..5 {
            attempt(&mut f, "h", AuthResult::BadPassword, now, &mut ev);
        }
        assert!(ev.iter().any(|e| matches!(e, LoginEvent::Lockout(_))));
        assert!(matches!(
            f.reply(reply("h", "alice", "pw"), ctx(now, "n"), &mut ev),
            Step::Refused(LoginRefused::SourceLocked { .. })
        ));
        assert!(matches!(
            f.init(None, "/", ctx(now, "n2")),
            Step::Refused(LoginRefused::SourceLocked { .. })
        ));
    }

    fn verify(f: &mut LoginFlow, step: Step, verdict: Verdict, ev: &mut Vec<LoginEvent>) -> Step {
        let Step::Verify {
            handle,
            group,
            user,
            factor,
            ..
        } = step
        else {
            panic!("expected a password check, got {step:?}");
        };
        let now = Instant::now();
        f.verified(
            Checking {
                handle,
                group,
                user,
                factor,
            },
            verdict,
            ctx(now, "new"),
            ev,
        )
    }

    #[test]
    fn a_challenge_asks_for_the_code_and_sends_the_state_back_for_the_same_user() {
        let (now, mut f, mut ev, step) = password_sent(flow(3), "alice");
        let challenge = Verdict::Challenge {
            prompt: "Enter the code".into(),
            state: b"s1".to_vec(),
        };
        assert_eq!(
            verify(&mut f, step, challenge.clone(), &mut ev),
            Step::Challenge {
                handle: "k".into(),
                group: "default".into(),
                prompt: "Enter the code".into(),
                error: None
            }
        );
        // The answer comes in the challenge field; a user name sent along
        // is ignored: the code is checked for the user who passed the
        // first factor.
        let mut answer = reply("k", "mallory", "");
        answer.answer = Some("123456".into());
        let step = f.reply(answer.clone(), ctx(now, "n"), &mut ev);
        assert_eq!(
            step,
            Step::Verify {
                handle: "k".into(),
                group: "default".into(),
                user: "alice".into(),
                password: "123456".into(),
                state: Some(b"s1".to_vec()),
                factor: Factor::First,
            }
        );
        // Challenges may follow each other (a new PIN, then a code).
        let step = verify(&mut f, step, challenge, &mut ev);
        assert!(matches!(step, Step::Challenge { .. }));
        let step = f.reply(answer, ctx(now, "n"), &mut ev);
        assert!(matches!(
            verify(&mut f, step, Verdict::Accept(Grant::default()), &mut ev),
            Step::Authenticated { user, .. } if user == "alice"
        ));
        assert!(ev.is_empty(), "{ev:?}");
    }

    #[test]
    fn a_wrong_code_counts_and_starts_over_with_the_password_form() {
        let (now, mut f, mut ev, step) = password_sent(flow(3), "alice");
        let challenge = Verdict::Challenge {
            prompt: "Code?".into(),
            state: b"s1".to_vec(),
        };
        verify(&mut f, step, challenge, &mut ev);
        // An empty answer: asked again, nothing counted.
        let step = f.reply(reply("k", "alice", ""), ctx(now, "n"), &mut ev);
        assert!(matches!(step, Step::Challenge { error: Some(_), .. }));
        let mut answer = reply("k", "", "");
        answer.answer = Some("000000".into());
        let step = f.reply(answer, ctx(now, "n"), &mut ev);
        let rejected = Verdict::Rejected {
            message: Some("Wrong code".into()),
        };
        assert_eq!(
            verify(&mut f, step, rejected, &mut ev),
            Step::Form {
                handle: "k".into(),
                group: "default".into(),
                error: Some("Wrong code".into())
            }
        );
        assert_eq!(
            ev,
            vec![LoginEvent::Failed {
                user: "alice".into(),
                reason: FailReason::Rejected
            }]
        );
        // The next reply is a username and password again.
        let step = f.reply(reply("k", "alice", "pw"), ctx(now, "n"), &mut ev);
        assert!(matches!(step, Step::Verify { state: None, .. }));
    }

    #[test]
    fn an_unavailable_server_is_not_a_failure() {
        let now = Instant::now();
        let mut f = flow(1);
        let mut ev = Vec::new();
        f.init(None, "/", ctx(now, "k"));
        for _ in 0..3 {
            let step = f.reply(reply("k", "alice", "pw"), ctx(now, "n"), &mut ev);
            assert_eq!(
                verify(&mut f, step, Verdict::Unavailable, &mut ev),
                Step::Form {
                    handle: "k".into(),
                    group: "default".into(),
                    error: Some(UNAVAILABLE.into())
                }
            );
        }
        assert!(ev.is_empty());
    }

    /// A flow whose one group has a second factor, with carol's password
    /// sent: her first check.
    fn contractor_carol() -> (Instant, LoginFlow, Vec<LoginEvent>, Step) {
        let f = LoginFlow::new(
            &Limits::default(),
            &AuthConfig::default(),
            vec![GroupConfig {
                second_factor: Some(crate::config::AuthMethod::Radius),
                ..GroupConfig::named("contractors")
            }],
        );
        password_sent(f, "carol")
    }

    /// Login "k" started on `f` and `user`'s password sent: the step that
    /// asks for its check.
    fn password_sent(mut f: LoginFlow, user: &str) -> (Instant, LoginFlow, Vec<LoginEvent>, Step) {
        let now = Instant::now();
        let mut ev = Vec::new();
        f.init(None, "/", ctx(now, "k"));
        let step = f.reply(reply("k", user, "pw"), ctx(now, "n"), &mut ev);
        (now, f, ev, step)
    }

    #[test]
    fn a_second_factor_follows_the_password_and_keeps_its_grant() {
        let (now, mut f, mut ev, step) = contractor_carol();
        assert!(matches!(
            step,
            Step::Verify {
                factor: Factor::First,
                ..
            }
        ));
        let ldap = Grant {
            source: crate::auth::AuthSource::Ldap,
            own_policy: Some("engineering".into()),
            ..Grant::default()
        };
        // The password passed: the code is asked for, not a session made.
        let step = verify(&mut f, step, Verdict::Accept(ldap.clone()), &mut ev);
        assert!(
            matches!(&step, Step::Challenge { prompt, .. } if prompt == SECOND_FACTOR_PROMPT),
            "{step:?}"
        );
        let mut code = reply("k", "", "");
        code.answer = Some("654321".into());
        let step = f.reply(code.clone(), ctx(now, "n"), &mut ev);
        assert!(
            matches!(&step, Step::Verify { factor: Factor::Second, user, state: None, .. } if user == "carol"),
            "{step:?}"
        );
        // The OTP server challenges once more (state kept, still the second
        // factor), then accepts with a Class: the session is the first
        // factor's, with the policy it granted.
        let challenge = Verdict::Challenge {
            prompt: "Next code".into(),
            state: b"s2".to_vec(),
        };
        assert!(matches!(
            verify(&mut f, step, challenge, &mut ev),
            Step::Challenge { .. }
        ));
        let step = f.reply(code, ctx(now, "n"), &mut ev);
        assert!(matches!(
            step,
            Step::Verify {
                factor: Factor::Second,
                ..
            }
        ));
        let otp = Grant {
            source: crate::auth::AuthSource::Radius,
            class: vec![b"c".to_vec()],
            ..Grant::default()
        };
        assert_eq!(
            verify(&mut f, step, Verdict::Accept(otp), &mut ev),
            Step::Authenticated {
                group: "contractors".into(),
                user: "carol".into(),
                grant: Grant {
                    class: vec![b"c".to_vec()],
                    ..ldap
                },
            }
        );
    }

    #[test]
    fn a_wrong_second_factor_starts_over_at_the_password() {
        let (now, mut f, mut ev, step) = contractor_carol();
        verify(&mut f, step, Verdict::Accept(Grant::default()), &mut ev);
        let mut code = reply("k", "", "");
        code.answer = Some("000000".into());
        let step = f.reply(code, ctx(now, "n"), &mut ev);
        let step = verify(&mut f, step, Verdict::Rejected { message: None }, &mut ev);
        assert!(
            matches!(step, Step::Form { error: Some(_), .. }),
            "{step:?}"
        );
        // The next reply is the password again, for the first factor.
        let step = f.reply(reply("k", "carol", "pw"), ctx(now, "n"), &mut ev);
        assert!(matches!(
            step,
            Step::Verify {
                factor: Factor::First,
                ..
            }
        ));
    }
}
