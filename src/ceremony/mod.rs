//! The security officer's CLI: creates, imports, rotates, retires, lists and exports
//! keys directly on the token. PINs come from the environment, a file or a prompt,
//! never argv; every action (success or failure) is written to the audit trail.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::appliance::audit::{AuditEvent, AuditOptions, AuditTrail};
use crate::appliance::audit_keys::{TokenAuditKeys, CHAIN_KEY, SIGN_KEY};
use crate::config::Config;
use crate::hsm::{
    self, set_des_parity, Algorithm, Compound, Hsm, HsmOptions, KeyClass, KeyMeta, KeyState, LEFT_SUFFIX, RIGHT_SUFFIX,
    VARIANT_SUFFIX,
};

/// Errors of the ceremony CLI.
#[derive(Debug, thiserror::Error)]
pub enum CeremonyError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Hsm(#[from] hsm::Error),
    #[error("audit trail: {0}")]
    Audit(#[from] crate::appliance::audit::AuditError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
}

/// Where the token and the audit trail are.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// Appliance config to take the token and audit settings from (instead of the options below).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// PKCS#11 module.
    #[arg(long, env = "KEYWARD_PKCS11_MODULE", default_value = "/usr/lib/softhsm/libsofthsm2.so", global = true)]
    pub module: PathBuf,
    /// Token label (the slot is found by label).
    #[arg(long, env = "KEYWARD_TOKEN_LABEL", default_value = "keyward", global = true)]
    pub token_label: String,
    /// Audit directory shared with the appliance.
    #[arg(long, env = "KEYWARD_AUDIT_DIR", global = true)]
    pub audit_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum CeremonyCmd {
    /// Create every key of a profile that is missing, then print the catalogue.
    Init {
        #[arg(long, default_value = "pkcs11-config/key-profile.toml")]
        profile: PathBuf,
    },
    /// Generate a new key inside the token (version 1, or the next version, active).
    Generate {
        name: String,
        #[arg(long)]
        class: KeyClass,
        #[arg(long)]
        algorithm: Algorithm,
    },
    /// New active version of NAME; the previous active version becomes verify/decrypt-only.
    Rotate { name: String },
    /// Retire one version: refused for every operation from then on.
    Retire {
        name: String,
        #[arg(long)]
        version: u32,
    },
    /// List the catalogue (name, version, class, algorithm, state, KCV).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print the public key of an asymmetric key as PEM SubjectPublicKeyInfo.
    ExportPublic {
        name: String,
        /// Version (default: the active one).
        #[arg(long, default_value_t = 0)]
        version: u32,
    },
    /// Import a key from N clear components (split knowledge). Each custodian types a
    /// hex component and confirms its KCV; the combined key's KCV is printed.
    ImportComponents {
        name: String,
        #[arg(long)]
        class: KeyClass,
        #[arg(long)]
        algorithm: Algorithm,
        /// Number of components (2-9; 1 only with --allow-single for tests of known keys).
        #[arg(long)]
        components: usize,
        /// Read components from these files (one hex component each) instead of prompting.
        #[arg(long, num_args = 1..)]
        component_files: Vec<PathBuf>,
        /// Read components from standard input, one hex line each.
        #[arg(long)]
        stdin: bool,
        /// Abort unless the combined key's KCV equals this value.
        #[arg(long)]
        expect_kcv: Option<String>,
        /// Allow a single component (loading a known test key).
        #[arg(long)]
        allow_single: bool,
    },
}

/// One key of a profile.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ProfileKey {
    pub name: String,
    pub class: KeyClass,
    pub algorithm: Algorithm,
    /// What the key is for (shown in the table).
    #[serde(default)]
    pub purpose: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    key: Vec<ProfileKey>,
}

/// Reads and validates a key profile.
pub fn read_profile(path: &Path) -> Result<Vec<ProfileKey>, CeremonyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CeremonyError::Usage(format!("profile {}: {e}", path.display())))?;
    let p: Profile =
        toml::from_str(&text).map_err(|e| CeremonyError::Usage(format!("profile {}: {e}", path.display())))?;
    let mut errors = Vec::new();
    for (i, k) in p.key.iter().enumerate() {
        if let Err(e) = hsm::validate_name(&k.name) {
            errors.push(format!("key[{i}].name: {e}"));
        }
        if k.class.usage(k.algorithm).is_none() {
            errors.push(format!("key[{i}] ({}): class {} does not allow {}", k.name, k.class, k.algorithm));
        }
    }
    if errors.is_empty() {
        Ok(p.key)
    } else {
        Err(CeremonyError::Usage(format!("profile {}:\n  {}", path.display(), errors.join("\n  "))))
    }
}

/// Reads the user PIN: KEYWARD_USER_PIN, else the file named by KEYWARD_USER_PIN_FILE, else a prompt.
pub fn user_pin_from_env() -> Result<SecretString, CeremonyError> {
    if let Ok(p) = std::env::var("KEYWARD_USER_PIN") {
        if !p.is_empty() {
            return Ok(SecretString::from(p));
        }
    }
    if let Ok(f) = std::env::var("KEYWARD_USER_PIN_FILE") {
        let text = std::fs::read_to_string(&f).map_err(|e| CeremonyError::Usage(format!("KEYWARD_USER_PIN_FILE {f}: {e}")))?;
        let pin = text.lines().next().unwrap_or("").trim().to_string();
        if pin.is_empty() {
            return Err(CeremonyError::Usage(format!("KEYWARD_USER_PIN_FILE {f} is empty")));
        }
        return Ok(SecretString::from(pin));
    }
    if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("Token user PIN: ")?;
        return Ok(SecretString::from(p));
    }
    Err(CeremonyError::Usage(
        "no user PIN: set KEYWARD_USER_PIN or KEYWARD_USER_PIN_FILE, or run on a terminal to be prompted".into(),
    ))
}

/// The token and audit trail a ceremony works on.
pub struct Ceremony {
    pub hsm: Hsm,
    audit_dir: PathBuf,
    audit: Option<AuditTrail>,
    officer: String,
}

impl Ceremony {
    /// Opens the token as `args` say (keys used in place: no session copies).
    pub fn open(args: &TokenArgs) -> Result<Ceremony, CeremonyError> {
        let (opts, audit_dir) = match &args.config {
            Some(path) => {
                let c = Config::load(path)?;
                (
                    HsmOptions {
                        module: c.hsm.module,
                        token_label: c.hsm.token_label,
                        user_pin: c.hsm.user_pin,
                        pool_size: 1,
                        session_copies: false,
                        recycle_after_objects: Some(0),
                    },
                    c.audit.dir,
                )
            }
            None => {
                let audit_dir = args.audit_dir.clone().ok_or_else(|| {
                    CeremonyError::Usage("no audit directory: pass --audit-dir, set KEYWARD_AUDIT_DIR or use --config".into())
                })?;
                (
                    HsmOptions {
                        module: args.module.clone(),
                        token_label: args.token_label.clone(),
                        user_pin: user_pin_from_env()?,
                        pool_size: 1,
                        session_copies: false,
                        recycle_after_objects: Some(0),
                    },
                    audit_dir,
                )
            }
        };
        let hsm = Hsm::open(opts)?;
        let officer = format!("ceremony:{}", std::env::var("USER").unwrap_or_else(|_| "officer".into()));
        let mut c = Ceremony { hsm, audit_dir, audit: None, officer };
        c.open_audit_if_ready()?;
        Ok(c)
    }

    /// The trail can be opened once the token holds both audit keys.
    fn open_audit_if_ready(&mut self) -> Result<(), CeremonyError> {
        if self.audit.is_some() {
            return Ok(());
        }
        let cat = self.hsm.catalogue();
        if cat.active(CHAIN_KEY).is_ok() && cat.active(SIGN_KEY).is_ok() {
            let keys = std::sync::Arc::new(TokenAuditKeys::new(self.hsm.clone()));
            let opts = AuditOptions { writer_name: "ceremony".into(), ..AuditOptions::default() };
            self.audit = Some(AuditTrail::open(&self.audit_dir, keys, opts)?);
        }
        Ok(())
    }

    /// Writes one ceremony line. Before the audit keys exist nothing can be chained;
    /// `init` records those actions as soon as the keys are there.
    fn record(&self, action: &str, keys: Vec<String>, result: &Result<(), String>) -> Result<(), CeremonyError> {
        let Some(trail) = &self.audit else {
            return Err(CeremonyError::Usage(format!(
                "the token has no `{CHAIN_KEY}` and `{SIGN_KEY}` keys yet: run `keyward ceremony init` first"
            )));
        };
        let (outcome, code, detail) = match result {
            Ok(()) => ("ok", "OK", None),
            Err(e) => ("error", "FAILED", Some(e.clone())),
        };
        let mut ev = AuditEvent::ceremony(action).with_client(&self.officer, "security-officer").with_outcome(outcome, code);
        for k in keys {
            ev = ev.with_key(k);
        }
        if let Some(d) = detail {
            ev = ev.with_detail(d);
        }
        trail.record_blocking(ev)?;
        Ok(())
    }

    /// Runs `f`, audits its outcome under `action`, and returns its result.
    fn audited<T>(
        &self,
        action: &str,
        keys: impl Fn(&T) -> Vec<String>,
        fallback_keys: Vec<String>,
        f: impl FnOnce() -> Result<T, CeremonyError>,
    ) -> Result<T, CeremonyError> {
        let r = f();
        let (ks, outcome) = match &r {
            Ok(v) => (keys(v), Ok(())),
            Err(e) => (fallback_keys, Err(e.to_string())),
        };
        self.record(action, ks, &outcome)?;
        r
    }

    /// Creates every profile key that is missing; returns the ones created.
    pub fn init(&mut self, profile: &[ProfileKey]) -> Result<Vec<KeyMeta>, CeremonyError> {
        let mut created = Vec::new();
        // Audit keys first, so every later action (and these two) can be chained.
        let mut order: Vec<&ProfileKey> = profile.iter().filter(|k| k.name == CHAIN_KEY || k.name == SIGN_KEY).collect();
        order.extend(profile.iter().filter(|k| k.name != CHAIN_KEY && k.name != SIGN_KEY));
        let mut pending_audit = Vec::new();
        for k in order {
            let probe = match Compound::of(k.class, k.algorithm) {
                Some(kind) => kind.part_names(&k.name).remove(0),
                None => k.name.clone(),
            };
            let exists = self.hsm.catalogue().versions(&probe).next().is_some();
            if exists {
                continue;
            }
            let meta = match self.create_version(&k.name, k.class, k.algorithm, None) {
                Ok(m) => m,
                Err(e) => {
                    let _ = self.open_audit_if_ready();
                    if self.audit.is_some() {
                        self.record("ceremony.init.generate", vec![format!("{}/v?", k.name)], &Err(e.to_string()))?;
                    }
                    return Err(e);
                }
            };
            self.open_audit_if_ready()?;
            if self.audit.is_some() {
                for m in pending_audit.drain(..) {
                    self.record("ceremony.init.generate", vec![m], &Ok(()))?;
                }
                self.record("ceremony.init.generate", vec![meta.key_ref()], &Ok(()))?;
            } else {
                pending_audit.push(meta.key_ref());
            }
            created.push(meta);
        }
        if self.audit.is_none() {
            return Err(CeremonyError::Usage(format!(
                "the profile must list `{CHAIN_KEY}` (M7 HMAC-SHA256) and `{SIGN_KEY}` (S0 EC-P256)"
            )));
        }
        Ok(created)
    }

    pub fn generate(&self, name: &str, class: KeyClass, alg: Algorithm) -> Result<KeyMeta, CeremonyError> {
        self.audited("ceremony.generate", |m: &KeyMeta| vec![m.key_ref()], vec![name.to_string()], || {
            self.create_version(name, class, alg, None)
        })
    }

    /// Creates the next version active, demoting the current active versions. A
    /// compound key (retail-MAC pair, TDES BDK and its variant) gets all its token
    /// keys at one version, from one value drawn from the token's RNG when generated.
    fn create_version(
        &self,
        name: &str,
        class: KeyClass,
        alg: Algorithm,
        value: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<KeyMeta, CeremonyError> {
        if [LEFT_SUFFIX, RIGHT_SUFFIX, VARIANT_SUFFIX].iter().any(|s| name.ends_with(s)) {
            return Err(CeremonyError::Usage(format!(
                "{name}: names ending in {LEFT_SUFFIX}, {RIGHT_SUFFIX} or {VARIANT_SUFFIX} are the parts of compound keys; name the key itself"
            )));
        }
        let parts: Vec<Part> = match Compound::of(class, alg) {
            Some(kind) => {
                let value = match value {
                    Some(v) => v,
                    None => {
                        let len = alg.secret_len().unwrap_or(16);
                        let mut v = self.hsm.random(len)?;
                        set_des_parity(&mut v);
                        v
                    }
                };
                if alg.secret_len() != Some(value.len()) {
                    return Err(CeremonyError::Usage(format!("{alg} key must be {:?} bytes", alg.secret_len())));
                }
                kind.parts(name, alg, &value).into_iter().map(|(n, a, v)| (n, a, Some(v))).collect()
            }
            None => vec![(name.to_string(), alg, value)],
        };
        let cat = self.hsm.catalogue();
        for (part, part_alg, _) in &parts {
            if let Some(e) = cat.versions(part).next() {
                if e.meta.class != class || e.meta.algorithm != *part_alg {
                    return Err(CeremonyError::Usage(format!(
                        "{part} exists as {} {}; a new version must keep class and algorithm",
                        e.meta.class, e.meta.algorithm
                    )));
                }
            }
        }
        let version = parts
            .iter()
            .map(|(part, _, _)| cat.versions(part).map(|e| e.meta.version).max().unwrap_or(0) + 1)
            .max()
            .unwrap_or(1);
        let previous: Vec<(String, u32)> = parts
            .iter()
            .flat_map(|(part, _, _)| {
                cat.versions(part)
                    .filter(|e| e.meta.state == KeyState::Active)
                    .map(|e| (part.clone(), e.meta.version))
                    .collect::<Vec<_>>()
            })
            .collect();
        drop(cat);
        // Companions first, the primary part (the name services look up first) last: if a
        // creation fails half-way, lookups keep using the previous complete version.
        let mut primary = None;
        for (part, part_alg, value) in parts.into_iter().rev() {
            primary = Some(self.hsm.create_key_at(&part, class, part_alg, value, KeyState::Active, Some(version))?);
        }
        for (part, v) in previous {
            self.hsm.set_state(&part, v, KeyState::VerifyOnly)?;
        }
        primary.ok_or_else(|| CeremonyError::Usage("no key created".into()))
    }

    /// Class and algorithm of an existing logical key, looking through compound parts.
    fn logical_key(&self, name: &str) -> Result<(KeyClass, Algorithm), CeremonyError> {
        let cat = self.hsm.catalogue();
        if let Some(e) = cat.versions(&format!("{name}{LEFT_SUFFIX}")).next() {
            return Ok((e.meta.class, Algorithm::Tdes2));
        }
        let e = cat.versions(name).next().ok_or_else(|| hsm::Error::KeyNotFound(name.to_string()))?;
        if e.meta.algorithm == Algorithm::Des || name.ends_with(VARIANT_SUFFIX) {
            return Err(CeremonyError::Usage(format!(
                "{name} is one part of a compound key: name the key itself (without {LEFT_SUFFIX}, {RIGHT_SUFFIX} or {VARIANT_SUFFIX})"
            )));
        }
        Ok((e.meta.class, e.meta.algorithm))
    }

    pub fn rotate(&self, name: &str) -> Result<KeyMeta, CeremonyError> {
        self.audited("ceremony.rotate", |m: &KeyMeta| vec![m.key_ref()], vec![name.to_string()], || {
            let (class, alg) = self.logical_key(name)?;
            self.create_version(name, class, alg, None)
        })
    }

    pub fn retire(&self, name: &str, version: u32) -> Result<KeyMeta, CeremonyError> {
        self.audited("ceremony.retire", |m: &KeyMeta| vec![m.key_ref()], vec![format!("{name}/v{version}")], || {
            if version == 0 {
                return Err(CeremonyError::Usage("--version must be 1 or more".into()));
            }
            let (class, alg) = self.logical_key(name)?;
            let parts = match Compound::of(class, alg) {
                Some(kind) => kind.part_names(name),
                None => vec![name.to_string()],
            };
            let cat = self.hsm.catalogue();
            for part in &parts {
                let e = cat.get(part, version)?;
                if e.meta.state == KeyState::Active {
                    return Err(CeremonyError::Usage(format!(
                        "{} is the active version: rotate {name} first, then retire it",
                        e.key_ref()
                    )));
                }
            }
            drop(cat);
            let mut first = None;
            for part in &parts {
                let m = self.hsm.set_state(part, version, KeyState::Retired)?;
                first.get_or_insert(m);
            }
            first.ok_or_else(|| CeremonyError::Usage("nothing retired".into()))
        })
    }

    /// The catalogue, plus keys refused by the flag check.
    pub fn list(&self) -> Vec<KeyMeta> {
        self.hsm.catalogue().iter().map(|e| e.meta.clone()).collect()
    }

    pub fn export_public(&self, name: &str, version: u32) -> Result<String, CeremonyError> {
        self.audited("ceremony.export-public", |_: &String| vec![name.to_string()], vec![name.to_string()], || {
            let cat = self.hsm.catalogue();
            let e = cat.get(name, version)?;
            let der = e
                .public_der
                .clone()
                .ok_or_else(|| CeremonyError::Usage(format!("{} is not an asymmetric key", e.key_ref())))?;
            let pkey = openssl::pkey::PKey::public_key_from_der(&der)
                .map_err(|err| CeremonyError::Usage(format!("public key: {err}")))?;
            let pem = pkey.public_key_to_pem().map_err(|err| CeremonyError::Usage(format!("public key: {err}")))?;
            Ok(String::from_utf8_lossy(&pem).into_owned())
        })
    }

    /// Combines clear components (XOR) in zeroizing memory and imports the key; the
    /// answer's KCV is the whole key's (for a compound key too).
    pub fn import_components(
        &self,
        name: &str,
        class: KeyClass,
        alg: Algorithm,
        components: &[Zeroizing<Vec<u8>>],
        expect_kcv: Option<&str>,
    ) -> Result<KeyMeta, CeremonyError> {
        self.audited("ceremony.import-components", |m: &KeyMeta| vec![m.key_ref()], vec![name.to_string()], || {
            let len = alg
                .secret_len()
                .ok_or_else(|| CeremonyError::Usage(format!("{alg} keys are generated in the token, not imported")))?;
            let mut combined = Zeroizing::new(vec![0u8; len]);
            for (i, c) in components.iter().enumerate() {
                if c.len() != len {
                    return Err(CeremonyError::Usage(format!(
                        "component {}: {alg} needs {len} bytes ({} hex digits), got {} bytes",
                        i + 1,
                        len * 2,
                        c.len()
                    )));
                }
                for (a, b) in combined.iter_mut().zip(c.iter()) {
                    *a ^= b;
                }
            }
            let kcv = self.hsm.kcv_of_value(alg, &combined)?;
            if let Some(expected) = expect_kcv {
                if !expected.eq_ignore_ascii_case(&kcv) {
                    return Err(CeremonyError::Usage(format!(
                        "combined KCV {kcv} does not match the expected {}: nothing imported",
                        expected.to_uppercase()
                    )));
                }
            }
            // A compound key's primary part (a retail-MAC key's left half) has a KCV of
            // its own; custodians and the sending bank quote the whole key's.
            let mut m = self.create_version(name, class, alg, Some(combined))?;
            m.kcv = kcv;
            Ok(m)
        })
    }

    /// KCV of one clear component, for the custodian to confirm.
    pub fn component_kcv(&self, alg: Algorithm, component: &Zeroizing<Vec<u8>>) -> Result<String, CeremonyError> {
        Ok(self.hsm.kcv_of_value(alg, component)?)
    }

    /// Writes the final checkpoint of this ceremony's audit lines.
    pub fn close(self) -> Result<(), CeremonyError> {
        if let Some(t) = self.audit {
            t.shutdown()?;
        }
        Ok(())
    }
}

/// One token key of a new version: name, algorithm, clear value (None: generated in the token).
type Part = (String, Algorithm, Option<Zeroizing<Vec<u8>>>);

/// Parses one hex component into zeroizing memory (spaces allowed between groups).
pub fn parse_component(text: &str) -> Result<Zeroizing<Vec<u8>>, CeremonyError> {
    let cleaned: Zeroizing<String> = Zeroizing::new(text.chars().filter(|c| !c.is_whitespace()).collect());
    hex::decode(cleaned.as_bytes())
        .map(Zeroizing::new)
        .map_err(|_| CeremonyError::Usage("component is not valid hex".into()))
}

/// Prints the catalogue as a table.
pub fn print_table(keys: &[KeyMeta], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{:<20} {:>3}  {:<5} {:<12} {:<12} KCV", "NAME", "VER", "CLASS", "ALGORITHM", "STATE")?;
    for k in keys {
        writeln!(
            out,
            "{:<20} {:>3}  {:<5} {:<12} {:<12} {}",
            k.name,
            k.version,
            k.class.as_str(),
            k.algorithm.as_str(),
            k.state.as_str(),
            k.kcv
        )?;
    }
    Ok(())
}

/// Runs one ceremony command.
pub fn run(args: &TokenArgs, cmd: CeremonyCmd) -> Result<(), CeremonyError> {
    let mut c = Ceremony::open(args)?;
    let mut out = std::io::stdout().lock();
    match cmd {
        CeremonyCmd::Init { profile } => {
            let profile = read_profile(&profile)?;
            let created = c.init(&profile)?;
            writeln!(out, "{} key(s) created; catalogue:", created.len())?;
            print_table(&c.list(), &mut out)?;
        }
        CeremonyCmd::Generate { name, class, algorithm } => {
            let m = c.generate(&name, class, algorithm)?;
            print_table(&[m], &mut out)?;
        }
        CeremonyCmd::Rotate { name } => {
            let m = c.rotate(&name)?;
            writeln!(out, "{} is now active; earlier versions are verify/decrypt-only", m.key_ref())?;
            print_table(&c.list().into_iter().filter(|k| k.name == name).collect::<Vec<_>>(), &mut out)?;
        }
        CeremonyCmd::Retire { name, version } => {
            let m = c.retire(&name, version)?;
            writeln!(out, "{} retired", m.key_ref())?;
        }
        CeremonyCmd::List { json } => {
            let keys = c.list();
            c.record("ceremony.list", Vec::new(), &Ok(()))?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&keys).map_err(std::io::Error::other)?)?;
            } else {
                print_table(&keys, &mut out)?;
                for (label, reason) in c.hsm.catalogue().refused() {
                    writeln!(out, "REFUSED {label}: {reason}")?;
                }
            }
        }
        CeremonyCmd::ExportPublic { name, version } => {
            write!(out, "{}", c.export_public(&name, version)?)?;
        }
        CeremonyCmd::ImportComponents {
            name,
            class,
            algorithm,
            components,
            component_files,
            stdin,
            expect_kcv,
            allow_single,
        } => {
            if components == 0 || components > 9 || (components == 1 && !allow_single) {
                return Err(CeremonyError::Usage(
                    "--components must be 2-9 (split knowledge); 1 only with --allow-single".into(),
                ));
            }
            let mut parts = Vec::with_capacity(components);
            if !component_files.is_empty() {
                if component_files.len() != components {
                    return Err(CeremonyError::Usage(format!(
                        "--components {components} but {} --component-files",
                        component_files.len()
                    )));
                }
                for f in &component_files {
                    let text = Zeroizing::new(std::fs::read_to_string(f)?);
                    parts.push(parse_component(&text)?);
                }
            } else if stdin {
                let lines = std::io::stdin().lock();
                for line in lines.lines().take(components) {
                    let line = Zeroizing::new(line?);
                    parts.push(parse_component(&line)?);
                }
                if parts.len() != components {
                    return Err(CeremonyError::Usage(format!("expected {components} component lines on stdin")));
                }
            } else {
                for i in 1..=components {
                    let text = Zeroizing::new(rpassword::prompt_password(format!("Custodian {i}: component (hex, hidden): "))?);
                    let part = parse_component(&text)?;
                    let kcv = c.component_kcv(algorithm, &part)?;
                    let answer = rpassword::prompt_password(format!("Component {i} KCV is {kcv}. Confirm? [y/N] "))?;
                    if !answer.trim().eq_ignore_ascii_case("y") {
                        return Err(CeremonyError::Usage(format!("component {i} not confirmed: nothing imported")));
                    }
                    parts.push(part);
                }
            }
            if !component_files.is_empty() || stdin {
                for (i, p) in parts.iter().enumerate() {
                    writeln!(out, "component {} KCV {}", i + 1, c.component_kcv(algorithm, p)?)?;
                }
            }
            let m = c.import_components(&name, class, algorithm, &parts, expect_kcv.as_deref())?;
            writeln!(out, "imported {} ({} {}), combined KCV {}", m.key_ref(), m.class, m.algorithm, m.kcv)?;
        }
    }
    drop(out);
    c.close()
}

/// Opens the token only (no audit trail): for `keyward audit verify`.
pub fn open_token_only(args: &TokenArgs) -> Result<Hsm, CeremonyError> {
    let opts = match &args.config {
        Some(path) => {
            let c = Config::load(path)?;
            HsmOptions { module: c.hsm.module, token_label: c.hsm.token_label, user_pin: c.hsm.user_pin, pool_size: 1, session_copies: false, recycle_after_objects: Some(0) }
        }
        None => HsmOptions {
            module: args.module.clone(),
            token_label: args.token_label.clone(),
            user_pin: user_pin_from_env()?,
            pool_size: 1,
            session_copies: false,
            recycle_after_objects: Some(0),
        },
    };
    Ok(Hsm::open(opts)?)
}
