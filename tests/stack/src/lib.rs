//! A private Supabase-like stack on loopback: a PostgreSQL 15 cluster and a
//! PostgREST-compatible server (postrust-server), for usage-agg's integration
//! tests, its demo and its benchmark.
//!
//! One cluster per process (tests share it; each test gets its own database
//! cloned from a prepared template and its own server, so tests run in
//! parallel). Everything listens on 127.0.0.1 on free ports, with data in a
//! private directory that is removed when the process exits.
//!
//! Set `USAGE_AGG_TEST_REST_URL`, `USAGE_AGG_TEST_KEY` and
//! `USAGE_AGG_TEST_DATABASE_URL` to run the same tests against any other
//! PostgREST (a real one, say) on a disposable database: the tests then
//! share it, run one at a time, and each starts by recreating the seed's
//! schema there.
//!
//! Between usage-agg and the server, three optional pieces: [`gateway`], a
//! stand-in for Supabase's API gateway (`/rest/v1/`, the `apikey` header,
//! `sb_secret_` keys), [`proxy`], which injects faults, and [`latency`],
//! which adds a round trip to every request (the benchmark's WAN). Apart
//! from them, [`browser`] drives a headless Chromium for the HTML report's
//! browser test.

pub mod browser;
pub mod gateway;
pub mod latency;
pub mod proxy;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

pub const SEED_SCHEMA: &str = include_str!("../sql/seed-schema.sql");
const ROLES: &str = include_str!("../sql/supabase-roles.sql");
const GRANTS: &str = include_str!("../sql/supabase-grants.sql");
const RLS: &str = include_str!("../sql/supabase-rls.sql");
const CRON: &str = include_str!("../sql/supabase-cron.sql");
/// The bootstrap superuser, as on Supabase. Tests connect as `postgres`,
/// which is not one; only what needs a superuser uses this role, and says
/// why.
pub const SUPERUSER: &str = "supabase_admin";
/// Supabase's global statement timeout (platform defaults): 2 minutes.
const STATEMENT_TIMEOUT_MS: u32 = 120_000;

/// Supabase's default `max_rows`: every test runs with the silent cap on.
pub const MAX_ROWS: u32 = 1000;
const TEMPLATE_DB: &str = "usage_agg_template";
/// The one database of the cluster that holds pg_cron (`cron.database_name`).
pub const CRON_DB: &str = "usage_agg_cron";
const JWT_SECRET: &str = "usage-agg-test-secret-at-least-32-characters-long";
/// Where PostgreSQL 15's server and tools are (Debian's layout).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The root of the repository (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// Where postrust is: `POSTRUST_BIN`, else the cache `scripts/install-postrust`
/// fills.
pub fn postrust_bin() -> PathBuf {
    if let Ok(p) = std::env::var("POSTRUST_BIN") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("USAGE_AGG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/usage-agg")
        });
    let bin = cache.join("postrust-3.1.0/bin/postrust");
    assert!(
        bin.exists(),
        "postrust is not installed at {}: run scripts/test (or scripts/install-postrust), which builds it once",
        bin.display()
    );
    bin
}

/// Whether Debian's postgresql-15-cron is installed (`scripts/setup`
/// installs it): then every cluster preloads pg_cron.
pub fn pg_cron_installed() -> bool {
    Path::new(PG_BIN).join("../lib/pg_cron.so").exists()
}

/// Where the safeupdate stand-in lives: PostgreSQL's own library folder,
/// where `scripts/setup` installs it.
fn safeupdate_installed() -> bool {
    Path::new(PG_BIN).join("../lib/safeupdate.so").exists()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A PostgreSQL cluster in a private directory. PostgreSQL refuses to run as
/// root, so as root every server command runs as the `postgres` user.
///
/// With pg_cron installed, the cluster preloads it (Supabase Cron), and
/// `cron.database_name` names [`CRON_DB`]: pg_cron keeps its job table in
/// one database per cluster and both settings take effect only at start.
/// That database is created at start from the template, with the extension,
/// so it is a test database like the others, holding pg_cron as a Supabase
/// project's own database does; [`Stack::with_cron`] hands it to the one
/// test that schedules. Jobs could also run in other databases
/// (`cron.schedule_in_database`), but the job table would not be there:
/// usage-agg's schedule functions read and write `cron.job` in the
/// project's database, as on Supabase. Every other test database has no
/// pg_cron, which is the "not enabled" case.
pub struct Cluster {
    dir: PathBuf,
    pub port: u16,
    next_db: AtomicUsize,
    /// Whether pg_cron is preloaded, and [`CRON_DB`] holds it.
    pub cron: bool,
}

impl Cluster {
    pub fn start() -> Cluster {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "usage-agg-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let data = dir.join("data");
        run(pg_cmd("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data));
        let mut last_err = String::new();
        let cron = pg_cron_installed();
        for _ in 0..5 {
            let port = free_port();
            let mut opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off -c max_prepared_transactions=20 -c max_connections=400 -c shared_buffers=256MB \
                 -c statement_timeout={STATEMENT_TIMEOUT_MS}",
                dir.display()
            );
            if cron {
                // Jobs connect over TCP like any client (cron.host), as the
                // role that scheduled them, on this port.
                opts.push_str(&format!(
                    " -c shared_preload_libraries=pg_cron -c cron.database_name={CRON_DB} -c cron.host=127.0.0.1"
                ));
            }
            let out = pg_cmd("pg_ctl")
                .arg("-D")
                .arg(&data)
                .args(["-w", "-t", "60", "-l"])
                .arg(dir.join("postgres.log"))
                .args(["-o", &opts, "start"])
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                let cluster = Cluster {
                    dir,
                    port,
                    next_db: AtomicUsize::new(0),
                    cron,
                };
                cluster.prepare_template();
                return cluster;
            }
            last_err = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default()
            );
        }
        panic!("PostgreSQL did not start: {last_err}");
    }

    /// The process-wide cluster, stopped when the process exits.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            extern "C" fn stop_at_exit() {
                if let Some(c) = SHARED.get() {
                    c.stop();
                }
            }
            let c = Cluster::start();
            // Statics are never dropped; the test harness ends with exit(),
            // which runs atexit handlers.
            // SAFETY: registering a plain extern "C" fn.
            unsafe { libc::atexit(stop_at_exit) };
            c
        })
    }

    /// A connection string as `postgres`, the role a Supabase project's
    /// owner, its migrations and its SQL editor use: not a superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection string as the superuser, for what only it may do.
    pub fn admin_url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// The template every test database is cloned from, made as a Supabase
    /// project is: the roles and their limits, the default privileges of
    /// `public`, then the seed's tables made by `postgres`, with row level
    /// security on.
    fn prepare_template(&self) {
        assert!(
            safeupdate_installed(),
            "the safeupdate stand-in is not installed in {PG_BIN}/../lib: run scripts/setup, which builds it"
        );
        let mut admin =
            postgres::Client::connect(&self.admin_url("postgres"), postgres::NoTls).unwrap();
        admin.batch_execute(ROLES).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {TEMPLATE_DB} OWNER postgres"))
            .unwrap();
        postgres::Client::connect(&self.admin_url(TEMPLATE_DB), postgres::NoTls)
            .unwrap()
            .batch_execute(GRANTS)
            .unwrap();
        let mut t = postgres::Client::connect(&self.url(TEMPLATE_DB), postgres::NoTls).unwrap();
        t.batch_execute(SEED_SCHEMA).unwrap();
        t.batch_execute(RLS).unwrap();
        drop(t); // a template cannot be copied while connected to
        if self.cron {
            admin
                .batch_execute(&format!(
                    "CREATE DATABASE {CRON_DB} TEMPLATE {TEMPLATE_DB} OWNER postgres"
                ))
                .unwrap();
            // CREATE EXTENSION pg_cron needs a superuser: on Supabase,
            // supabase_admin creates it (supautils), then grants postgres.
            postgres::Client::connect(&self.admin_url(CRON_DB), postgres::NoTls)
                .unwrap()
                .batch_execute(CRON)
                .unwrap();
        }
    }

    /// A fresh database holding the seed's schema and Supabase's grants.
    pub fn create_database(&self) -> String {
        self.clone_database(TEMPLATE_DB)
    }

    fn clone_database(&self, template: &str) -> String {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::SeqCst));
        self.create_from(&name, template);
        name
    }

    /// `CREATE DATABASE name TEMPLATE template`, owned by `postgres`.
    fn create_from(&self, name: &str, template: &str) {
        postgres::Client::connect(&self.admin_url("postgres"), postgres::NoTls)
            .unwrap()
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE {template} OWNER postgres"
            ))
            .unwrap();
    }

    /// A fresh database with `files` applied, cloned from a template that
    /// has them (made once per list and process, by `psql -f` as `postgres`
    /// as a user applies them). Cloning takes a tenth of a second; applying
    /// every migration to each test's database took seconds.
    pub fn create_database_with(&self, files: &[PathBuf]) -> String {
        static TEMPLATES: Mutex<Vec<(Vec<PathBuf>, String)>> = Mutex::new(Vec::new());
        let template = {
            let mut templates = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
            match templates.iter().find(|(f, _)| f == files) {
                Some((_, name)) => name.clone(),
                None => {
                    let name = format!("usage_agg_template_{}", templates.len() + 1);
                    self.create_from(&name, TEMPLATE_DB);
                    if let Err(e) = apply_files(&self.url(&name), files) {
                        panic!("preparing the migrated template: {e}");
                    }
                    templates.push((files.to_vec(), name.clone()));
                    name
                }
            }
        };
        self.clone_database(&template)
    }

    pub fn stop(&self) {
        let _ = pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `psql -f FILE` against `url`, as a user applies a migration.
fn psql_file_on(url: &str, file: &Path) -> std::process::Output {
    Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f"])
        .arg(file)
        .output()
        .expect("run psql")
}

/// Applies `files` in order, one `psql -f` each; the first failure's
/// output is the error.
fn apply_files(url: &str, files: &[PathBuf]) -> Result<(), String> {
    for file in files {
        let out = psql_file_on(url, file);
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

fn pg_cmd(tool: &str) -> Command {
    let path = Path::new(PG_BIN).join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mints an HS256 JWT carrying `role`, as Supabase's keys do.
pub fn mint_jwt(role: &str, secret: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let header = B64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = B64.encode(format!(
        r#"{{"iss":"supabase","role":"{role}","iat":1700000000,"exp":4102444800}}"#
    ));
    let signing_input = format!("{header}.{payload}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        B64.encode(mac.finalize().into_bytes())
    )
}

/// The external PostgREST the tests run against instead of our own stack
/// (`USAGE_AGG_TEST_REST_URL`), if one is named.
fn external_rest_url() -> Option<String> {
    std::env::var("USAGE_AGG_TEST_REST_URL").ok()
}

/// One test's world: a database and a REST server in front of it.
pub struct Stack {
    /// The REST base (tables at `<rest_url>/<table>`).
    pub rest_url: String,
    /// A service_role key.
    pub key: String,
    /// An anon key for the same project.
    pub anon_key: String,
    /// A direct connection string, for ground truth, as `postgres`.
    pub database_url: String,
    /// The same database as the superuser, for what only it may do
    /// (`USAGE_AGG_TEST_ADMIN_DATABASE_URL` for an external PostgREST).
    pub admin_database_url: Option<String>,
    server: Option<Child>,
    server_env: Vec<(String, String)>,
    _exclusive: Option<MutexGuard<'static, ()>>,
}

impl Default for Stack {
    /// The stack the tests use: see [`Stack::new`].
    fn default() -> Stack {
        Stack::new()
    }
}

impl Stack {
    /// A new database on the shared cluster with its own server, or the
    /// external PostgREST named by `USAGE_AGG_TEST_*`, emptied.
    pub fn new() -> Stack {
        match external_rest_url() {
            Some(rest_url) => Stack::external(rest_url),
            None => Stack::on(Cluster::shared()),
        }
    }

    /// As [`Stack::new`], with `files` applied (`psql -f`, in order): on
    /// our own cluster, a clone of a template that has them.
    pub fn with_files(files: &[PathBuf]) -> Stack {
        if let Some(rest_url) = external_rest_url() {
            let mut stack = Stack::external(rest_url);
            stack.psql_files(files).unwrap_or_else(|e| panic!("{e}"));
            return stack;
        }
        let cluster = Cluster::shared();
        Stack::serving(cluster, cluster.create_database_with(files), MAX_ROWS)
    }

    pub fn on(cluster: &Cluster) -> Stack {
        Stack::with_max_rows(cluster, MAX_ROWS)
    }

    /// A stack whose server caps responses at `max_rows` (Supabase allows
    /// raising the cap; `local-stack --max-rows` does).
    pub fn with_max_rows(cluster: &Cluster, max_rows: u32) -> Stack {
        Stack::serving(cluster, cluster.create_database(), max_rows)
    }

    /// The stack on the cluster's database that holds pg_cron ([`CRON_DB`]),
    /// or the external PostgREST named by `USAGE_AGG_TEST_*` (which may or
    /// may not have pg_cron). One test per process may take it: jobs
    /// scheduled there run for as long as the cluster does.
    pub fn with_cron() -> Stack {
        if let Some(rest_url) = external_rest_url() {
            return Stack::external(rest_url);
        }
        static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let cluster = Cluster::shared();
        assert!(
            cluster.cron,
            "pg_cron is not installed (Debian's postgresql-15-cron): run scripts/setup, which installs it"
        );
        assert!(
            !TAKEN.swap(true, Ordering::SeqCst),
            "only one test may take the pg_cron database"
        );
        Stack::serving(cluster, CRON_DB.to_string(), MAX_ROWS)
    }

    fn serving(cluster: &Cluster, db: String, max_rows: u32) -> Stack {
        let database_url = cluster.url(&db);
        let admin_database_url = Some(cluster.admin_url(&db));
        let server_env = vec![
            (
                "PGRST_DB_URI".into(),
                format!("postgres://authenticator@127.0.0.1:{}/{db}", cluster.port),
            ),
            ("PGRST_DB_SCHEMAS".into(), "public".into()),
            ("PGRST_DB_ANON_ROLE".into(), "anon".into()),
            ("PGRST_JWT_SECRET".into(), JWT_SECRET.into()),
            ("PGRST_DB_MAX_ROWS".into(), max_rows.to_string()),
            ("PGRST_DB_POOL".into(), "4".into()),
            ("PGRST_DB_CHANNEL_ENABLED".into(), "true".into()),
            ("PGRST_SERVER_HOST".into(), "127.0.0.1".into()),
            ("PGRST_COMPAT_MODE".into(), "true".into()),
            ("PGRST_LOG_LEVEL".into(), "error".into()),
        ];
        let mut stack = Stack {
            rest_url: String::new(),
            key: mint_jwt("service_role", JWT_SECRET),
            anon_key: mint_jwt("anon", JWT_SECRET),
            database_url,
            admin_database_url,
            server: None,
            server_env,
            _exclusive: None,
        };
        stack.start_server();
        stack
    }

    fn external(rest_url: String) -> Stack {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let var = |n: &str| {
            std::env::var(n)
                .unwrap_or_else(|_| panic!("USAGE_AGG_TEST_REST_URL is set, so {n} must be too"))
        };
        let mut stack = Stack {
            rest_url: rest_url.trim_end_matches('/').to_string(),
            key: var("USAGE_AGG_TEST_KEY"),
            anon_key: std::env::var("USAGE_AGG_TEST_ANON_KEY").unwrap_or_default(),
            database_url: var("USAGE_AGG_TEST_DATABASE_URL"),
            admin_database_url: std::env::var("USAGE_AGG_TEST_ADMIN_DATABASE_URL").ok(),
            server: None,
            server_env: Vec::new(),
            _exclusive: Some(guard),
        };
        // Every test starts from the seed's schema, as on our own stack:
        // the database must be a disposable one.
        stack
            .sql()
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS usage_aggregation_state, portal_usage_monthly, usage_requests CASCADE;
                 DO $$ DECLARE f regprocedure; BEGIN
                   FOR f IN SELECT p.oid::regprocedure FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                            WHERE n.nspname = 'public' AND p.proname LIKE 'usage\\_agg\\_%' LOOP
                     EXECUTE format('DROP FUNCTION %s CASCADE', f);
                   END LOOP;
                 END $$;
                 {GRANTS}
                 {SEED_SCHEMA}
                 {RLS}"
            ))
            .unwrap();
        stack.reload_schema();
        stack
    }

    pub fn is_external(&self) -> bool {
        self.server_env.is_empty()
    }

    fn start_server(&mut self) {
        let bin = postrust_bin();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .envs(self.server_env.iter().map(|(k, v)| (k, v)))
                .env("PGRST_SERVER_PORT", port.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start postrust");
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port race: try another
                }
                if http_status(port, "/_/ready") == Some(200) {
                    self.rest_url = format!("http://127.0.0.1:{port}");
                    self.server = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(25)); // readiness poll
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("postrust did not become ready");
    }

    fn stop_server(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A direct connection for ground truth and set-up, as `postgres`.
    pub fn sql(&self) -> postgres::Client {
        postgres::Client::connect(&self.database_url, postgres::NoTls).expect("connect to postgres")
    }

    /// A direct connection as the superuser, for the few things `postgres`
    /// may not do on Supabase either (each caller says why).
    pub fn admin_sql(&self) -> postgres::Client {
        let url = self.admin_database_url.as_deref().expect(
            "this test needs a superuser: set USAGE_AGG_TEST_ADMIN_DATABASE_URL for an external PostgREST",
        );
        postgres::Client::connect(url, postgres::NoTls).expect("connect to postgres as superuser")
    }

    /// Runs DDL, then makes the server see the new schema: our own server is
    /// restarted (deterministic); an external one is told to reload.
    pub fn ddl(&mut self, sql: &str) {
        self.sql().batch_execute(sql).unwrap();
        self.reload_schema();
    }

    /// Applies a SQL file the way a user does: `psql -f`.
    pub fn psql_file(&mut self, file: &Path) -> std::process::Output {
        let out = psql_file_on(&self.database_url, file);
        self.reload_schema();
        out
    }

    /// Applies SQL files in order, one `psql -f` each as a user does, and
    /// stops at the first that fails (its output is the error). The server
    /// sees the new schema once, after the last: a restart per file was
    /// most of a test's time.
    pub fn psql_files(&mut self, files: &[PathBuf]) -> Result<(), String> {
        let result = apply_files(&self.database_url, files);
        self.reload_schema();
        result
    }

    pub fn reload_schema(&mut self) {
        if self.is_external() {
            // PostgREST has no "reloaded" signal, but its root (the OpenAPI
            // description) carries the schema's comment: set a fresh one,
            // ask for a reload, and wait until the root shows it. (postrust's
            // root is not an OpenAPI document; our own stack restarts it.)
            static N: AtomicUsize = AtomicUsize::new(0);
            let nonce = format!(
                "usage-agg test schema {} {}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            );
            self.sql()
                .batch_execute(&format!(
                    "COMMENT ON SCHEMA public IS '{nonce}'; NOTIFY pgrst, 'reload schema'"
                ))
                .unwrap();
            let http = reqwest::blocking::Client::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let body = http
                    .get(format!("{}/", self.rest_url))
                    .header("apikey", &self.key)
                    .bearer_auth(&self.key)
                    .send()
                    .and_then(|r| r.text())
                    .unwrap_or_default();
                if body.contains(&nonce) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "PostgREST did not reload its schema cache within 30 s"
                );
                std::thread::sleep(Duration::from_millis(50)); // polling for the reload
            }
        } else {
            self.stop_server();
            self.start_server();
        }
    }

    /// A Supabase-like gateway in front of this stack's server (see
    /// [`gateway`]): the project URL is its `url`, the REST API under
    /// `/rest/v1/`. Start it after any DDL: our own server is restarted on
    /// a new port to see a new schema, and the gateway keeps the old one.
    pub fn gateway(&self) -> gateway::Gateway {
        gateway::Gateway::start(
            &self.rest_url,
            gateway::GatewayKeys {
                service_role_jwt: self.key.clone(),
                anon_jwt: self.anon_key.clone(),
                jwt_secret: (!self.is_external()).then(|| JWT_SECRET.to_string()),
            },
        )
    }

    /// The environment a `usage-agg --env dev` run needs to reach this stack.
    /// An external PostgREST on another host over plain http is refused by
    /// usage-agg unless `USAGE_AGG_ALLOW_INSECURE_HTTP=1`: set in the tests'
    /// environment, it is passed on.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("SUPABASE_DEV_URL".into(), self.rest_url.clone()),
            ("SUPABASE_DEV_REST_URL".into(), self.rest_url.clone()),
            ("SUPABASE_DEV_SERVICE_ROLE_KEY".into(), self.key.clone()),
        ];
        const OPT_IN: &str = "USAGE_AGG_ALLOW_INSECURE_HTTP";
        if let Some(v) = std::env::var(OPT_IN).ok().filter(|_| self.is_external()) {
            env.push((OPT_IN.into(), v));
        }
        env
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop_server();
    }
}

/// A bare HTTP/1.0 GET, enough for a readiness check without a client crate.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Inserts `n` sample rows: `portals` portals over the given months, about 5%
/// errors, ids in insertion order. Returns nothing; read ground truth by SQL.
pub fn insert_sample_rows(db: &mut postgres::Client, n: i64, portals: i64, months: &[&str]) {
    let months = months
        .iter()
        .map(|m| format!("'{m}'"))
        .collect::<Vec<_>>()
        .join(",");
    db.batch_execute(&format!(
        "INSERT INTO usage_requests (portal_id, request_timestamp, source_date, source_format, target_format, success, error_message, month_year)
         SELECT 1000 + (g::bigint * 7919) % {portals},
                (m || '-01')::timestamp + ((g % 27) || ' days')::interval + ((g % 86400) || ' seconds')::interval,
                '2025-01-01', 'YYYY-MM-DD', 'DD/MM/YYYY',
                g % 20 <> 0,
                CASE WHEN g % 20 = 0 THEN 'unparseable date' END,
                m
         FROM generate_series(1, {n}) g,
              LATERAL (SELECT (ARRAY[{months}])[1 + (g % array_length(ARRAY[{months}], 1))] AS m) mm"
    ))
    .unwrap();
}

/// The webhook-shaped rows' law: portals drawn from a Zipf-like law of this
/// exponent (a few portals make most of the calls).
pub const WEBHOOK_ZIPF_S: f64 = 1.1;
/// The share of webhook-shaped rows that arrive late, for the previous month.
pub const WEBHOOK_LATE_SHARE: f64 = 0.02;

/// Inserts rows `offset + 1 ..= offset + n` of a webhook-shaped table of
/// `total` rows, as a webhook writes them: the current month (`month`)
/// active, ids in time order (`request_timestamp` rises with the id, from
/// the month's start to its end over the `total` rows), portals `1000 ..
/// 1000 + portals` drawn from a Zipf-like law ([`WEBHOOK_ZIPF_S`]: the
/// inverse of the continuous power law's distribution over `[1, portals +
/// 1)`, floored, so rank k is drawn about as often as k^-s; rank 1 is portal
/// 1000), and a trickle ([`WEBHOOK_LATE_SHARE`]) of late rows for
/// `previous_month`, timed in it. Otherwise as [`insert_sample_rows`]: the
/// same columns, about 5% errors. Deterministic: the draws follow
/// `setseed`, seeded by `offset`, so the same arguments give the same rows.
pub fn insert_webhook_rows(
    db: &mut postgres::Client,
    offset: i64,
    n: i64,
    total: i64,
    portals: i64,
    month: &str,
    previous_month: &str,
) {
    let s = WEBHOOK_ZIPF_S;
    let late = WEBHOOK_LATE_SHARE;
    let seed = (offset % 1_000_003) as f64 / 1_000_003.0;
    db.batch_execute(&format!(
        "SELECT setseed({seed});
         INSERT INTO usage_requests (portal_id, request_timestamp, source_date, source_format, target_format, success, error_message, month_year)
         SELECT 999 + least({portals}, floor(power(1 - x.u * (1 - power({portals} + 1.0::float8, 1 - {s}::float8)), 1 / (1 - {s}::float8)))::bigint),
                CASE WHEN x.late
                     THEN '{previous_month}-01'::timestamp + random() * ('{month}-01'::timestamp - '{previous_month}-01'::timestamp)
                     ELSE '{month}-01'::timestamp + ((x.g - 1)::float8 / {total}) * interval '1 month' END,
                '2025-01-01', 'YYYY-MM-DD', 'DD/MM/YYYY',
                x.g % 20 <> 0,
                CASE WHEN x.g % 20 = 0 THEN 'unparseable date' END,
                CASE WHEN x.late THEN '{previous_month}' ELSE '{month}' END
         FROM (SELECT g, random() AS u, random() < {late} AS late
                 FROM generate_series({offset} + 1, {offset} + {n}) g) x"
    ))
    .unwrap();
}
