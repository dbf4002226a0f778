#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Test harness: the real binary, real TLS, a fresh key device (a SoftHSM
//! token, or with `TVW_TEST_BACKEND=tpm` an swtpm) and LMDB store per
//! appliance (inside its own temp dir), killed on drop.
#![allow(dead_code)]

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The spec's vectors, read the way the unit tests read them (one copy).
#[path = "../src/testvectors.rs"]
pub mod testvectors;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenvault-webhook");

/// One of `choices` from the environment variable `var` (unset or empty:
/// the first). Anything else fails the run.
fn env_choice(var: &str, choices: &[&'static str]) -> &'static str {
    let v = std::env::var(var).unwrap_or_default();
    if v.is_empty() {
        return choices[0];
    }
    choices
        .iter()
        .copied()
        .find(|c| *c == v)
        .unwrap_or_else(|| panic!("{var}={v:?}: expected one of {choices:?}"))
}

/// The key backend the suite runs against: `TVW_TEST_BACKEND` (`pkcs11`,
/// the default, or `tpm`).
pub fn backend() -> &'static str {
    env_choice("TVW_TEST_BACKEND", &["pkcs11", "tpm"])
}

pub fn tpm() -> bool {
    backend() == "tpm"
}

/// The store the suite runs against: `TVW_TEST_STORE` (`lmdb`, the
/// default, or `postgres`: a throwaway PostgreSQL cluster per appliance,
/// made by `.ci/pg-cluster`).
pub fn store_backend() -> &'static str {
    env_choice("TVW_TEST_STORE", &["lmdb", "postgres"])
}

pub fn postgres() -> bool {
    store_backend() == "postgres"
}

const PG_CLUSTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/pg-cluster");

/// A PostgreSQL cluster (in `DIR.pg` beside an appliance's DIR), running
/// while any handle to it lives: stopped when the last one drops.
pub struct PgCluster {
    pub dir: PathBuf,
}

/// Runs `cmd`; it must succeed (`what` names it in the failure). Its stdout.
fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl PgCluster {
    fn cmd(&self, what: &str) {
        run_ok(
            Command::new(PG_CLUSTER).arg(what).arg(&self.dir),
            &format!("pg-cluster {what} {}", self.dir.display()),
        );
    }

    /// Makes a cluster on a free loopback port (not started).
    pub fn init(dir: &Path) -> PgCluster {
        assert!(
            ["17", "16", "15"]
                .iter()
                .any(|v| Path::new(&format!("/usr/lib/postgresql/{v}/bin/initdb")).exists()),
            "PostgreSQL is required (apt-get install postgresql); this test does not skip"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        run_ok(
            Command::new(PG_CLUSTER)
                // The suite's clusters skip fsync (nothing here survives an
                // OS crash anyway); commits still wait for the server.
                .env("PG_CLUSTER_FSYNC", "off")
                .arg("init")
                .arg(dir)
                .arg(port.to_string()),
            "pg-cluster init",
        );
        PgCluster {
            dir: dir.to_path_buf(),
        }
    }

    /// The running cluster in `dir` (started if it is not), shared.
    pub fn running(dir: &Path) -> Arc<PgCluster> {
        static OPEN: Mutex<Vec<(PathBuf, std::sync::Weak<PgCluster>)>> = Mutex::new(Vec::new());
        let mut open = OPEN.lock().unwrap();
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(c) = open
            .iter()
            .find(|(p, _)| p == dir)
            .and_then(|(_, w)| w.upgrade())
        {
            return c;
        }
        let c = Arc::new(PgCluster {
            dir: dir.to_path_buf(),
        });
        c.start();
        open.push((dir.to_path_buf(), Arc::downgrade(&c)));
        c
    }

    pub fn start(&self) {
        self.cmd("start");
    }

    /// A fast shutdown (clients disconnected, nothing committed lost).
    pub fn stop(&self) {
        self.cmd("stop");
    }

    pub fn url(&self) -> String {
        std::fs::read_to_string(self.dir.join("url"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `dev` options that put a new appliance's store in this cluster.
    pub fn dev_args(&self) -> Vec<String> {
        vec![
            "--postgres".into(),
            self.url(),
            "--postgres-ca".into(),
            self.dir.join("ca.pem").display().to_string(),
            "--postgres-password-file".into(),
            self.dir.join("password").display().to_string(),
        ]
    }

    /// Runs SQL as the appliance's database user (psql over TLS).
    pub fn sql(&self, sql: &str) -> String {
        let pw = std::fs::read_to_string(self.dir.join("password")).unwrap();
        run_ok(
            Command::new("psql")
                .arg(self.url())
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .env("PGPASSWORD", pw.trim())
                .env("PGSSLMODE", "verify-full")
                .env("PGSSLROOTCERT", self.dir.join("ca.pem")),
            "psql",
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new(PG_CLUSTER).arg("kill").arg(&self.dir).output();
    }
}

/// Where the cluster of the appliance in `dir` lives.
pub fn pg_dir_for(dir: &Path) -> PathBuf {
    let mut p = dir.as_os_str().to_os_string();
    p.push(".pg");
    PathBuf::from(p)
}

/// The running cluster of the appliance in `dir`, if it has one.
pub fn start_pg_for(dir: &Path) -> Option<Arc<PgCluster>> {
    let d = pg_dir_for(dir);
    d.join("data").exists().then(|| PgCluster::running(&d))
}

pub fn require_backend() {
    if tpm() {
        assert!(
            tokenvault_webhook::keys::tpm::swtpm::available(),
            "swtpm is required (apt-get install swtpm swtpm-tools); this test does not skip"
        );
    } else {
        require_softhsm();
    }
}

pub fn require_softhsm() {
    let found = [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    assert!(
        found,
        "SoftHSM2 is required (apt-get install softhsm2); this test does not skip"
    );
}

pub struct Appliance {
    pub dir: PathBuf,
    child: Option<Child>,
    pub base: String,
    pub log: Arc<Mutex<Vec<String>>>,
    pub client: reqwest::Client,
    pub secret: Option<Vec<u8>>,
    /// The simulator `serve` talks to (dev runs its own); dropped after the child.
    swtpm: Option<tokenvault_webhook::keys::tpm::swtpm::Swtpm>,
    /// The store's database (`TVW_TEST_STORE=postgres`), dropped after the child.
    pub pg: Option<Arc<PgCluster>>,
}

impl Appliance {
    /// `dev --dir DIR --listen 127.0.0.1:0` in a new temp dir.
    pub fn start_new() -> (tempfile::TempDir, Appliance) {
        let tmp = tempfile::tempdir().unwrap();
        let a = Appliance::start_dev(&tmp.path().join("appliance"));
        (tmp, a)
    }

    pub fn start_dev(dir: &Path) -> Appliance {
        require_backend();
        Self::start_dev_backend(dir, backend())
    }

    /// `dev` with the store in a new PostgreSQL cluster whatever
    /// `TVW_TEST_STORE` says (the multi-node tests).
    pub fn start_dev_postgres(dir: &Path) -> Appliance {
        require_softhsm();
        Self::start_dev_with(dir, "pkcs11", true)
    }

    /// `serve` on an existing dev dir with `env` set (a frozen clock).
    pub fn start_serve_env(dir: &Path, env: &[(&str, &str)]) -> Appliance {
        let swtpm = start_swtpm_for(dir);
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .arg("serve");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, dir, swtpm)
    }

    /// Another node of this appliance (`dev --join`), in `dir`: the same
    /// store (its PostgreSQL database) and SoftHSM2 token, its own
    /// listener and state dir.
    pub fn second_node(&self, dir: &Path) -> Appliance {
        let mut cmd = Command::new(BIN);
        cmd.arg("dev")
            .arg("--dir")
            .arg(dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--join")
            .arg(&self.dir);
        let mut b = Self::spawn(cmd, dir, None);
        b.pg = self.pg.clone();
        b.secret = self.secret.clone();
        b
    }

    /// `dev` with an explicit backend (tests of one backend's own behaviour).
    pub fn start_dev_backend(dir: &Path, backend: &str) -> Appliance {
        Self::start_dev_with(dir, backend, postgres())
    }

    /// `dev` on LMDB whatever `TVW_TEST_STORE` says.
    pub fn start_dev_lmdb(dir: &Path) -> Appliance {
        require_softhsm();
        Self::start_dev_with(dir, "pkcs11", false)
    }

    fn start_dev_with(dir: &Path, backend: &str, pg: bool) -> Appliance {
        let mut cmd = Command::new(BIN);
        cmd.arg("dev")
            .arg("--dir")
            .arg(dir)
            .arg("--listen")
            .arg("127.0.0.1:0");
        if !dir.join("config.toml").exists() {
            cmd.arg("--backend").arg(backend);
            if pg {
                assert_eq!(
                    backend, "pkcs11",
                    "the postgres store runs with the pkcs11 backend"
                );
                cmd.args(PgCluster::init(&pg_dir_for(dir)).dev_args());
            }
        }
        Self::spawn(cmd, dir, None)
    }

    /// A dev dir provisioned by `dev`, then `extra` appended to its config and
    /// served with `serve --config`.
    pub fn start_configured(extra: &str) -> (tempfile::TempDir, Appliance) {
        Self::start_configured_env(extra, &[])
    }

    /// [`Appliance::start_configured`] with a clock frozen at `at` (unix
    /// seconds; the `dev` profile honours `TVW_TEST_FROZEN_CLOCK`).
    pub fn start_frozen(extra: &str, at: i64) -> (tempfile::TempDir, Appliance) {
        Self::start_configured_env(extra, &[("TVW_TEST_FROZEN_CLOCK", &at.to_string())])
    }

    fn start_configured_env(extra: &str, env: &[(&str, &str)]) -> (tempfile::TempDir, Appliance) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("appliance");
        let mut a = Appliance::start_dev(&dir);
        a.terminate();
        let mut cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
        cfg.push('\n');
        cfg.push_str(extra);
        std::fs::write(dir.join("config.toml"), cfg).unwrap();
        let swtpm = start_swtpm_for(&dir);
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .arg("serve");
        for (k, v) in env {
            cmd.env(k, v);
        }
        (tmp, Self::spawn(cmd, &dir, swtpm))
    }

    /// `serve --config DIR/config.toml` on an existing dev dir.
    pub fn start_serve(dir: &Path) -> Appliance {
        Self::start_serve_with(dir, &[])
    }

    /// Like [`Appliance::start_serve`], with global options (`--landlock off`) first.
    pub fn start_serve_with(dir: &Path, global: &[&str]) -> Appliance {
        let swtpm = start_swtpm_for(dir);
        let mut cmd = Command::new(BIN);
        cmd.args(global)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .arg("serve");
        Self::spawn(cmd, dir, swtpm)
    }

    fn spawn(
        mut cmd: Command,
        dir: &Path,
        swtpm: Option<tokenvault_webhook::keys::tpm::swtpm::Swtpm>,
    ) -> Appliance {
        let pg = start_pg_for(dir);
        cmd.env("RUST_LOG", "info")
            .env_remove("SOFTHSM2_CONF")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tokenvault-webhook");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("READY ") {
                    let url = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(url);
                }
                log2.lock().unwrap().push(line);
            }
        });
        // A bound on start-up, not a performance assertion.
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "appliance did not become ready:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let client = client_trusting(&dir.join("tls/cert.pem"));
        Appliance {
            dir: dir.to_path_buf(),
            child: Some(child),
            base,
            log,
            client,
            secret: None,
            swtpm,
            pg,
        }
    }

    /// Files that belong to the key device itself (skipped by scans for
    /// secrets in the appliance's own files): the SoftHSM token directory.
    /// The TPM backend has none: its sealed blobs are scanned too.
    pub fn device_dirs(&self) -> Vec<PathBuf> {
        if tpm() {
            Vec::new()
        } else {
            vec![self.dir.join("hsm/tokens")]
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
        // The simulator outlives a crash of its server only in this harness.
        self.swtpm.take();
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let c = self.child.as_mut()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                self.swtpm.take();
                return st.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `GET /v1/health` as JSON.
    pub async fn health(&self) -> Value {
        self.client
            .get(self.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// register-url from the CLI, then /v1/exchange over HTTPS.
    pub async fn bind(&mut self) -> Value {
        let reg = cli_json(&["--config", self.config().to_str().unwrap(), "register-url"]);
        let (s, v) = self.exchange(&reg["code"]).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// `/v1/exchange` of `code`; on 200 the answer's secret becomes this
    /// appliance's.
    pub async fn exchange(&mut self, code: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url("/v1/exchange"))
            .json(&json!({ "code": code }))
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if s == 200 {
            self.secret = Some(secret_of(&v));
        }
        (s, v)
    }

    /// `serve` again on this appliance's dir (after `terminate`), keeping
    /// the secret it was bound with.
    pub fn serve_again(&self) -> Appliance {
        let mut b = Appliance::start_serve(&self.dir);
        b.secret = self.secret.clone();
        b
    }

    /// `oauth-client add NAME` with a 0600 secret file; `extra`: more options.
    pub fn add_oauth_client(&self, name: &str, token_url: &str, extra: &[&str]) {
        let f = self.dir.join(format!("{name}.secret"));
        std::fs::write(&f, "client-secret-xyz\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = self.config();
        let mut args = vec![
            "--config",
            cfg.to_str().unwrap(),
            "oauth-client",
            "add",
            name,
            "--client-id",
            "cid-1",
            "--client-secret-file",
            f.to_str().unwrap(),
            "--token-url",
            token_url,
        ];
        args.extend_from_slice(extra);
        let out = cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `GET /v1/totp-code` for `svc` with a fresh ticket.
    pub async fn totp_code(&self, svc: &str) -> Value {
        let tk = self.ticket("totp_code", svc, json!({}));
        json_of(self.client.get(format!(
            "{}?ticket={tk}&service={svc}",
            self.url("/v1/totp-code")
        )))
        .await
    }

    /// SIGHUP (certificate reload), then waits for the `n`th log line
    /// holding `needle`.
    pub async fn sighup_and_wait(&self, needle: &str, n: usize) {
        // SAFETY: a signal to the child this harness started.
        unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) };
        self.wait_log_count(needle, n).await;
    }

    /// The status of `GET /v1/health` on a new connection from a client
    /// that trusts only `cert` (which certificate is served now).
    pub async fn health_trusting(&self, cert: &Path) -> u16 {
        client_trusting(cert)
            .get(self.url("/v1/health"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn signed_with(
        &self,
        secret: &[u8],
        path: &str,
        body: &Value,
        rid: &str,
    ) -> (u16, Value) {
        let raw = serde_json::to_vec(body).unwrap();
        let ts = now().to_string();
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("x-tokenvault-signature", sign(secret, &ts, &raw))
            .header("x-tokenvault-timestamp", &ts)
            .header("x-tokenvault-request-id", rid)
            .body(raw)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn signed(&self, path: &str, body: Value) -> (u16, Value) {
        let secret = self.secret.clone().expect("bind first");
        self.signed_with(&secret, path, &body, &new_rid()).await
    }

    pub async fn storage(&self, body: Value) -> Value {
        let (s, v) = self.signed("/v1/storage", body.clone()).await;
        assert_eq!(s, 200, "{body} -> {v}");
        v
    }
}

impl Appliance {
    /// A ticket as Token Vault signs it: base64url(payload).hex(HMAC(payload_b64)).
    pub fn ticket(&self, pur: &str, svc: &str, extra: Value) -> String {
        make_ticket(self.secret.as_ref().expect("bind first"), pur, svc, extra)
    }

    pub async fn store(&self, svc: &str, token_data: Value) -> (u16, Value) {
        let body = json!({"ticket": self.ticket("store", svc, json!({})), "service": svc, "tokenData": token_data});
        let r = self
            .client
            .post(self.url("/v1/store"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// [`Appliance::store`] for setup: the store must succeed.
    pub async fn store_ok(&self, svc: &str, token_data: Value) {
        let (s, v) = self.store(svc, token_data).await;
        assert_eq!(s, 200, "setup store of {svc}: {v}");
    }

    /// `GET path` (`/v1/credential`, `/v1/totp-code`) with a fresh ticket
    /// for `pur` carrying `claims` (e.g. `{"aid": …}`).
    pub async fn read_as(&self, path: &str, pur: &str, svc: &str, claims: Value) -> (u16, Value) {
        let tk = self.ticket(pur, svc, claims);
        let url = format!("{}?ticket={tk}&service={svc}", self.url(path));
        let r = self.client.get(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// This appliance's CLI (`--config` given); must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let cfg = self.config();
        let mut all = vec!["--config", cfg.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = cli(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The same, expected to fail; its stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let cfg = self.config();
        let mut all = vec!["--config", cfg.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = cli(&all);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub async fn credential(&self, svc: &str, query: &str) -> (u16, Value) {
        let tk = self.ticket("agent_credential", svc, json!({}));
        let url = format!(
            "{}?ticket={tk}&service={svc}{query}",
            self.url("/v1/credential")
        );
        let r = self.client.get(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// For `serve` on a dev dir made with the TPM backend: that dir's swtpm
/// (state DIR/swtpm, ports from its config), as `dev` would run it.
pub fn start_swtpm_for(dir: &Path) -> Option<tokenvault_webhook::keys::tpm::swtpm::Swtpm> {
    use tokenvault_webhook::keys::tpm::swtpm;
    let cfg = std::fs::read_to_string(dir.join("config.toml")).ok()?;
    if !cfg.contains("backend = \"tpm\"") {
        return None;
    }
    let port = cfg
        .lines()
        .find_map(|l| l.trim().strip_prefix("tcti = \""))
        .and_then(|t| swtpm::port_of(t.trim_end_matches('"')))
        .expect("swtpm tcti in config");
    Some(swtpm::start(&dir.join("swtpm"), port).expect("start swtpm"))
}

pub fn client_trusting(cert: &Path) -> reqwest::Client {
    let pem = std::fs::read(cert).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .tls_built_in_root_certs(false)
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Sends a request and parses its JSON answer (whatever the status).
pub async fn json_of(rb: reqwest::RequestBuilder) -> Value {
    rb.send().await.unwrap().json().await.unwrap()
}

pub fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SOFTHSM2_CONF")
        .output()
        .unwrap()
}

pub fn cli_json(args: &[&str]) -> Value {
    let out = cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A seed with a one-hour step stored for `svc` (its code stays the
/// current one for a whole test); the current code.
pub async fn enrol_hour_totp(a: &Appliance, svc: &str) -> String {
    let b32 = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ";
    let (s, v) = a
        .store(svc, json!({"totpSecret": b32, "totpPeriod": 3600}))
        .await;
    assert_eq!(s, 200, "{v}");
    totp_now(b32, 3600)
}

/// The current code of a base32 seed with a `period`-second step (SHA-1,
/// 6 digits), computed in software as a client would.
pub fn totp_now(b32: &str, period: u64) -> String {
    use tokenvault_webhook::custody::totp::{base32_decode, code_software, Params};
    let p = Params {
        period,
        ..Params::default()
    };
    code_software(&base32_decode(b32).unwrap(), &p, now() as u64).to_string()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn sign(secret: &[u8], ts: &str, body: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(ts.as_bytes());
    m.update(b".");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

pub fn new_rid() -> String {
    let mut b = [0u8; 6];
    getrandom::getrandom(&mut b).unwrap();
    format!("req_{}", hex::encode(b))
}

/// Every file under `dir` (recursively), skipping `skip` subtrees.
pub fn files_under(dir: &Path, skip: &[&Path]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if skip.iter().any(|s| d.starts_with(s)) {
            continue;
        }
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every readable mapping of `pid`, concatenated (via /proc/PID/mem; root).
pub fn read_process_memory(pid: u32) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (needs root)");
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let range = f.next().unwrap();
        let perms = f.next().unwrap();
        if !perms.starts_with('r') || line.contains("[vvar") || line.contains("[vsyscall]") {
            continue;
        }
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).unwrap(),
            u64::from_str_radix(hi, 16).unwrap(),
        );
        let mut buf = vec![0u8; (hi - lo) as usize];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        out.extend_from_slice(&buf);
        // Separate regions so a match never spans two of them.
        out.push(0);
    }
    out
}

/// A ticket as Token Vault signs it: single-use nonce, 60 s life.
pub fn make_ticket(secret: &[u8], pur: &str, svc: &str, extra: Value) -> String {
    let mut c = json!({"sub":"user-1","svc":svc,"pur":pur,"iat":now(),"exp":now()+60,"nonce":new_rid().replace("req_", "n0nce")});
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string());
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(p.as_bytes());
    format!("{p}.{}", hex::encode(m.finalize().into_bytes()))
}

/// The readable mappings of `pid` that hold `needle`, as (mapping line,
/// locked): locked mappings (`lo` in smaps' VmFlags) are the appliance's
/// mlocked key and cache pages.
pub fn mappings_holding(pid: u32, needle: &[u8]) -> Vec<(String, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut mem =
        std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (needs root)");
    let mut out = Vec::new();
    let mut cur: Option<(String, u64, u64, bool)> = None;
    let mut regions = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            if let Some(r) = cur.take() {
                regions.push(r);
            }
            let (lo, hi) = first.split_once('-').unwrap();
            let readable = line
                .split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with('r'));
            if readable && !line.contains("[vvar") && !line.contains("[vsyscall]") {
                cur = Some((
                    line.to_string(),
                    u64::from_str_radix(lo, 16).unwrap(),
                    u64::from_str_radix(hi, 16).unwrap(),
                    false,
                ));
            }
        } else if let (Some(flags), Some(r)) = (line.strip_prefix("VmFlags:"), cur.as_mut()) {
            r.3 = flags.split_whitespace().any(|f| f == "lo");
        }
    }
    regions.extend(cur);
    for (line, lo, hi, locked) in regions {
        let mut buf = vec![0u8; (hi - lo) as usize];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if memchr::memmem::find(&buf, needle).is_some() {
            out.push((line, locked));
        }
    }
    out
}

/// Asserts an answer is the spec's JSON error `code` with `status`.
#[track_caller]
pub fn assert_refused(status: u16, answer: &Value, want_status: u16, code: &str) {
    assert_eq!(
        (status, answer["error"].as_str()),
        (want_status, Some(code)),
        "{answer}"
    );
}

/// The series' value in a Prometheus text page (panics if absent).
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

impl Appliance {
    /// The metrics listener's URL (the appliance was configured with
    /// `[metrics] listen = "127.0.0.1:0"`).
    pub fn metrics_url(&self) -> String {
        self.log_text()
            .lines()
            .find_map(|l| l.strip_prefix("METRICS ").map(str::to_string))
            .expect("the METRICS line: configure [metrics] listen")
    }

    /// The metrics page as text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.metrics_url())
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until the server reports `n` open connections.
    pub async fn wait_connections(&self, n: u64) {
        self.wait_metrics(&format!("{n} open connections"), |m| {
            metric(m, "tvw_connections_open") == n
        })
        .await;
    }

    /// Polls the metrics page until `ready` holds for it: the event a test
    /// waits for. Bounded (60 s) only so that a broken server fails the
    /// test instead of hanging it; the bound is never what is tested.
    pub async fn wait_metrics(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = self.metrics().await;
            if ready(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "never saw {what}:\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the log until it holds `needle` (bounded like [`Appliance::wait_metrics`]).
    pub async fn wait_log(&self, needle: &str) {
        self.wait_log_count(needle, 1).await;
    }

    /// Polls the log until `n` lines hold `needle`.
    pub async fn wait_log_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let count = || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
        };
        while count() < n {
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?} {n} times:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Appliance {
    /// Like [`Appliance::start_configured`], with `edit` applied to the
    /// provisioned config first (for keys in sections `dev` already wrote).
    pub fn start_edited(
        edit: impl Fn(String) -> String,
        extra: &str,
    ) -> (tempfile::TempDir, Appliance) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("appliance");
        let mut a = Appliance::start_dev(&dir);
        a.terminate();
        let mut cfg = edit(std::fs::read_to_string(dir.join("config.toml")).unwrap());
        cfg.push('\n');
        cfg.push_str(extra);
        std::fs::write(dir.join("config.toml"), cfg).unwrap();
        (tmp, Appliance::start_serve(&dir))
    }

    /// The listener's port.
    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }
}

/// A client whose connections come from `from` (another loopback address).
pub fn client_from(a: &Appliance, from: &str) -> reqwest::Client {
    let pem = std::fs::read(a.dir.join("tls/cert.pem")).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .tls_built_in_root_certs(false)
        .local_address(from.parse::<IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A raw TLS connection from `from` to the appliance (for what reqwest will
/// not do: a body that never finishes).
pub async fn raw_tls(
    a: &Appliance,
    from: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let pem = std::fs::read(a.dir.join("tls/cert.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from.parse().unwrap(), 0))?;
    let tcp = sock
        .connect(SocketAddr::new("127.0.0.1".parse().unwrap(), a.port()))
        .await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// The HMAC secret in an `/v1/exchange` answer.
pub fn secret_of(exchange_answer: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(exchange_answer["hmacSecret"].as_str().unwrap())
        .unwrap()
}
