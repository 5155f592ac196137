//! Authentication: wrong passwords, unknown cookies, the session limit, and
//! config validation — each observed through the real client.

use std::{process::Command, time::Duration};

use vpn_tests::*;

const CAROL: TestUser = TestUser {
    name: "carol",
    password: "carol-pw",
    group_policy: None,
};

#[test]
fn wrong_password_gets_the_form_again_and_is_logged() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut client = Client::start(&topo, &gw, "alice", "not-her-password", &[]).unwrap();
    // The form comes back with our error; openconnect asks again, reads EOF
    // from stdin and gives up on its own.
    let status = client
        .wait_exit(Duration::from_secs(20))
        .expect("openconnect gave up");
    assert!(!status.success());
    let log = client.log();
    assert!(log.contains("invalid username or password"), "{log}");
    assert!(client.reasons().is_empty(), "no tunnel was set up");

    let failed: Vec<_> = gw
        .events()
        .into_iter()
        .filter(|e| e["event"] == "authentication_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["user"], "alice");
    assert_eq!(failed[0]["reason"], "wrong password");
    assert!(
        failed[0]["source_address"]
            .as_str()
            .unwrap()
            .starts_with(CLIENT_OUTSIDE)
    );
    assert!(gw.sessions().unwrap().is_empty());

    // An unknown user is logged with its own reason.
    let mut c2 = Client::start(&topo, &gw, "mallory", "x", &[]).unwrap();
    c2.wait_exit(Duration::from_secs(20))
        .expect("openconnect gave up");
    assert!(
        gw.events()
            .iter()
            .any(|e| e["event"] == "authentication_failed"
                && e["user"] == "mallory"
                && e["reason"] == "unknown user")
    );
}

#[test]
fn unknown_cookie_is_refused() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut client = Client::start_with_cookie(&topo, &gw, &"ab".repeat(32)).unwrap();
    let status = client
        .wait_exit(Duration::from_secs(20))
        .expect("openconnect gave up");
    // openconnect exits 2 when the server rejects the cookie.
    assert_eq!(status.code(), Some(2), "{}", client.log());
    assert!(client.log().contains("401"), "{}", client.log());
    assert!(gw.sessions().unwrap().is_empty());
}

#[test]
fn session_limit_refuses_the_next_login_and_keeps_the_others() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            server: "max_sessions = 2",
            ..Default::default()
        },
        &[ALICE, BOB, CAROL],
    )
    .unwrap();
    let mut a = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    a.wait_connected(Duration::from_secs(20)).unwrap();
    let cookie_b = authenticate(&topo, &gw, BOB.name, BOB.password).unwrap();
    assert!(!cookie_b.is_empty());
    assert_eq!(gw.sessions().unwrap().len(), 2);

    // The third login is refused with a message the client shows.
    let mut c = Client::start(&topo, &gw, CAROL.name, CAROL.password, &[]).unwrap();
    let status = c
        .wait_exit(Duration::from_secs(20))
        .expect("openconnect gave up");
    assert!(!status.success());
    assert!(
        c.log().contains("limit of 2 concurrent sessions"),
        "{}",
        c.log()
    );
    let refused: Vec<_> = gw
        .events()
        .into_iter()
        .filter(|e| e["event"] == "login_refused")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["user"], "carol");

    // The existing sessions are untouched: alice still passes traffic.
    assert_eq!(gw.sessions().unwrap().len(), 2);
    assert!(topo.client.ping(SERVER, 2));
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = TempDir::new("cfg").unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[tunnel]\npool_v4 = \"198.19.0.0/24\"\n[client_routing]\nmode = \"include\"\n",
    )
    .unwrap();
    let out = Command::new(bin_dir().join("vpnd"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("client routing mode 'include' needs at least one valid subnet in CIDR form"),
        "{err}"
    );
    std::fs::write(&path, "[tunnel]\npool_v4 = \"198.19.0.0/24\"\n").unwrap();
    let out = Command::new(bin_dir().join("vpnd"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn users_managed_with_vpnctl_log_in_and_pick_a_group() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[[group]]\nname = \"eng\"\nlabel = \"Engineering\"\n\n[[group]]\nname = \"sales\"\nlabel = \"Sales\"\n\n[[group_policy]]\nname = \"contractors\"\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let out = gw.vpnctl_user(&["add", "dave", "--group-policy", "contractors"], "dave-pw");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&gw.users_file).unwrap();
    assert!(
        text.contains("$argon2id$") && !text.contains("dave-pw"),
        "only the hash is stored"
    );
    let list = String::from_utf8(gw.vpnctl_user(&["list"], "").stdout).unwrap();
    assert!(
        list.contains("dave") && list.contains("contractors"),
        "{list}"
    );
    let dup = gw.vpnctl_user(&["add", "dave"], "x");
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));

    // The running daemon picks the new user up; openconnect picks the
    // group by its label.
    let mut c = Client::start(&topo, &gw, "dave", "dave-pw", &["--authgroup", "Sales"]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    let s = gw.sessions().unwrap();
    assert_eq!(s[0]["user"], "dave");
    assert_eq!(s[0]["group"], "sales");
    assert_eq!(
        s[0]["group_policy"], "contractors",
        "the policy given with `user add`"
    );
    drop(c);

    // A changed password takes effect; a deleted user cannot log in.
    assert!(
        gw.vpnctl_user(&["passwd", "dave"], "new-pw")
            .status
            .success()
    );
    let mut old = Client::start(
        &topo,
        &gw,
        "dave",
        "dave-pw",
        &["--authgroup", "Engineering"],
    )
    .unwrap();
    let st = old.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!st.success(), "{}", old.log());
    assert!(
        old.log().contains("invalid username or password"),
        "{}",
        old.log()
    );
    assert!(gw.vpnctl_user(&["del", "dave"], "").status.success());
    let mut gone = Client::start(
        &topo,
        &gw,
        "dave",
        "new-pw",
        &["--authgroup", "Engineering"],
    )
    .unwrap();
    assert!(!gone.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(
        gw.events()
            .iter()
            .any(|e| e["event"] == "authentication_failed"
                && e["user"] == "dave"
                && e["reason"] == "unknown user")
    );
}

#[test]
fn tls12_only_clients_are_served() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[tls]\ntls13 = false\n",
            ..Default::default()
        },
        &[ALICE],
    )
    .unwrap();
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(c.log().contains("(TLS1.2)"), "{}", c.log());
    assert!(topo.client.ping(SERVER, 2));
}

#[test]
fn vpnctl_events_lists_filters_and_follows() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let mut bad = Client::start(&topo, &gw, "alice", "wrong", &[]).unwrap();
    bad.wait_exit(Duration::from_secs(20)).unwrap();

    // Follow the connects from now on, in the background.
    let mut follow = std::process::Command::new(bin_dir().join("vpnctl"))
        .arg("--socket")
        .arg(&gw.socket)
        .args(["events", "--follow", "--json", "--type", "client_connected"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut c = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
    let line = rx.recv_timeout(Duration::from_secs(10));
    let _ = follow.kill();
    let _ = follow.wait();
    let followed: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(followed["event"], "client_connected");
    assert_eq!(followed["user"], "alice");

    // Filtered by type and user, in JSON and as text.
    let json = gw
        .vpnctl(&[
            "events",
            "--json",
            "--type",
            "authentication_failed",
            "--user",
            "alice",
            "--since",
            "1h",
        ])
        .unwrap();
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{json}");
    assert_eq!(lines[0]["reason"], "wrong password");
    let text = gw.vpnctl(&["events", "--user", "alice"]).unwrap();
    assert!(text.contains("authentication_failed"), "{text}");
    assert!(text.contains("client_connected"), "{text}");
    assert!(
        gw.vpnctl(&["events", "--user", "nobody"])
            .unwrap()
            .is_empty()
    );
    assert!(gw.vpnctl(&["events", "--since", "yesterday-ish"]).is_err());
}

/// Moving from ocserv: a password file made by the real `ocpasswd` (crypt
/// SHA-256, Debian's build) plus a crypt SHA-512 line (`openssl passwd
/// -6`) and a locked user is imported as is; the real openconnect logs in
/// with the old passwords, a wrong one is refused, and `passwd` moves the
/// user to argon2id.
#[test]
fn an_ocpasswd_file_imports_as_is_and_its_passwords_log_in() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE]).unwrap();
    let oc = gw.dir.path().join("ocpasswd");
    let mut p = std::process::Command::new("ocpasswd")
        .arg("-c")
        .arg(&oc)
        .arg("olga")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ocpasswd (apt-get install ocserv)");
    use std::io::Write as _;
    write!(p.stdin.take().unwrap(), "olga-pw\nolga-pw\n").unwrap();
    assert!(p.wait().unwrap().success());
    let sha512 = std::process::Command::new("openssl")
        .args(["passwd", "-6", "pavel-pw"])
        .output()
        .unwrap();
    let mut text = std::fs::read_to_string(&oc).unwrap();
    assert!(text.starts_with("olga:*:$5$"), "{text}");
    text += &format!(
        "pavel:eng:{}\nlocked:*:!$5$abc$def\n",
        String::from_utf8_lossy(&sha512.stdout).trim()
    );
    std::fs::write(&oc, text).unwrap();

    let out = gw.vpnctl_user(&["import", oc.to_str().unwrap()], "");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("imported 2 users"), "{stdout}");
    assert!(
        stderr.contains("line 3: user 'locked' is locked"),
        "{stderr}"
    );
    // A second import changes nothing and says so.
    let again = gw.vpnctl_user(&["import", oc.to_str().unwrap()], "");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("left as they are: olga, pavel"),
        "{again:?}"
    );

    for (user, pw) in [("olga", "olga-pw"), ("pavel", "pavel-pw")] {
        let mut c = Client::start(&topo, &gw, user, pw, &[]).unwrap();
        c.wait_connected(Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{user}: {e}\n{}", c.log()));
        drop(c);
    }
    let mut wrong = Client::start(&topo, &gw, "olga", "pavel-pw", &[]).unwrap();
    assert!(wrong.wait_exit(Duration::from_secs(20)).is_some());
    assert!(
        gw.events()
            .iter()
            .any(|e| e["event"] == "authentication_failed" && e["user"] == "olga")
    );

    assert!(
        gw.vpnctl_user(&["passwd", "olga"], "olga-new")
            .status
            .success()
    );
    let text = std::fs::read_to_string(&gw.users_file).unwrap();
    assert!(!text.contains("$5$"), "olga is on argon2id now");
    let mut c = Client::start(&topo, &gw, "olga", "olga-new", &[]).unwrap();
    c.wait_connected(Duration::from_secs(20)).unwrap();
}
