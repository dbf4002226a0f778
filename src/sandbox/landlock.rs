//! Landlock, derived from the configuration and applied before any thread
//! exists (before the LMDB writer and the tokio runtime). When the kernel has
//! Landlock, the ruleset for its ABI (up to V6) must be fully enforced: a
//! weaker result is an error. Every allowed path must exist.

use landlock::{
    Access, AccessFs, AccessNet, NetPort, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    /// `None`: binding is not restricted (listening on an ephemeral port).
    /// TCP ports it may bind (None: not restricted).
    pub bind_ports: Option<Vec<u16>>,
    /// `None`: outbound connections are not restricted (dev).
    pub connect_ports: Option<Vec<u16>>,
}

/// The kernel's Landlock ABI version (0: none).
pub fn kernel_abi() -> i32 {
    // SAFETY: the documented version query: NULL attr, size 0, flag VERSION.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

fn abi_for(v: i32) -> ABI {
    match v {
        ..=0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        _ => ABI::V6,
    }
}

/// Result of [`apply`], for the start-up log.
#[derive(Debug)]
pub struct Applied {
    pub abi: i32,
    pub rules: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("landlock: allowed path {0} does not exist (fix the configuration or create it)")]
    MissingPath(PathBuf),
    #[error("landlock: {0}")]
    Ruleset(String),
    #[error("landlock: ruleset not fully enforced on a kernel with ABI {0} ({1:?})")]
    NotEnforced(i32, RulesetStatus),
}

/// Anything short of full enforcement on a kernel that has Landlock is an
/// error: the service does not run half-sandboxed.
fn fully_enforced(kabi: i32, status: RulesetStatus) -> Result<(), SandboxError> {
    match status {
        RulesetStatus::FullyEnforced => Ok(()),
        other => Err(SandboxError::NotEnforced(kabi, other)),
    }
}

pub fn apply(plan: &Plan) -> Result<Option<Applied>, SandboxError> {
    let kabi = kernel_abi();
    if kabi <= 0 {
        return Ok(None);
    }
    let abi = abi_for(kabi);
    for p in plan.read_only.iter().chain(plan.read_write.iter()) {
        if !p.exists() {
            return Err(SandboxError::MissingPath(p.clone()));
        }
    }
    let err = |e: landlock::RulesetError| SandboxError::Ruleset(e.to_string());
    let mut rules = Vec::new();
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?;
    let net_abi = kabi >= 4;
    if net_abi {
        let mut net = AccessNet::ConnectTcp & AccessNet::BindTcp; // empty
        if plan.bind_ports.is_some() {
            net |= AccessNet::BindTcp;
        }
        if plan.connect_ports.is_some() {
            net |= AccessNet::ConnectTcp;
        }
        if !net.is_empty() {
            ruleset = ruleset.handle_access(net).map_err(err)?;
        }
    }
    if kabi >= 6 {
        ruleset = ruleset
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(err)?;
        rules.push("scope: abstract unix sockets and signals limited to this domain".into());
    }
    let mut created = ruleset.create().map_err(err)?;
    let read = AccessFs::from_read(abi);
    let all = AccessFs::from_all(abi);
    for (paths, access, what) in [(&plan.read_only, read, "ro"), (&plan.read_write, all, "rw")] {
        for p in paths {
            let fd = PathFd::new(p)
                .map_err(|e| SandboxError::Ruleset(format!("{}: {e}", p.display())))?;
            // A file gets only file rights; a directory everything beneath it.
            let access = if p.is_dir() {
                access
            } else {
                access & AccessFs::from_file(abi)
            };
            created = created
                .add_rule(PathBeneath::new(fd, access))
                .map_err(err)?;
            rules.push(format!("{what} {}", p.display()));
        }
    }
    if net_abi {
        if let Some(ports) = &plan.bind_ports {
            for port in ports {
                created = created
                    .add_rule(NetPort::new(*port, AccessNet::BindTcp))
                    .map_err(err)?;
                rules.push(format!("bind tcp/{port}"));
            }
        } else {
            rules.push("bind: not restricted (ephemeral listen port)".into());
        }
        match &plan.connect_ports {
            Some(ports) => {
                for port in ports {
                    created = created
                        .add_rule(NetPort::new(*port, AccessNet::ConnectTcp))
                        .map_err(err)?;
                    rules.push(format!("connect tcp/{port}"));
                }
            }
            None => rules.push("connect: not restricted (dev)".into()),
        }
    }
    let status = created.restrict_self().map_err(err)?;
    fully_enforced(kabi, status.ruleset)?;
    Ok(Some(Applied { abi: kabi, rules }))
}

/// Probes, from inside the sandbox, an unlisted path and an unlisted port;
/// returns one line each with what the kernel answered.
pub fn self_test(plan: &Plan) -> Vec<String> {
    let mut out = Vec::new();
    // Resolve symlinks first (/etc/os-release points into /usr/lib).
    let covered = |p: &Path| {
        let real = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        plan.read_only
            .iter()
            .chain(plan.read_write.iter())
            .any(|a| real.starts_with(a) || p.starts_with(a))
    };
    if let Some(probe) = ["/etc/passwd", "/etc/hostname", "/etc/os-release"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists() && !covered(p))
    {
        let r = std::fs::File::open(probe);
        out.push(match r {
            Ok(_) => format!("landlock self-test: open {} ALLOWED", probe.display()),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => format!(
                "landlock self-test: open {} denied (EACCES)",
                probe.display()
            ),
            Err(e) => format!("landlock self-test: open {} failed: {e}", probe.display()),
        });
    }
    if let Some(ports) = &plan.connect_ports {
        let port = (1u16..).find(|p| !ports.contains(p)).unwrap_or(1);
        let r = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            std::time::Duration::from_millis(200),
        );
        out.push(match r {
            Ok(_) => format!("landlock self-test: connect 127.0.0.1:{port} ALLOWED"),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                format!("landlock self-test: connect 127.0.0.1:{port} denied (EACCES)")
            }
            Err(e) => format!("landlock self-test: connect 127.0.0.1:{port} failed: {e}"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_or_no_enforcement_is_refused_with_the_kernel_abi() {
        assert!(fully_enforced(6, RulesetStatus::FullyEnforced).is_ok());
        // (RulesetStatus is neither Copy nor Clone: each twice.)
        for (st, want) in [
            (
                RulesetStatus::PartiallyEnforced,
                RulesetStatus::PartiallyEnforced,
            ),
            (RulesetStatus::NotEnforced, RulesetStatus::NotEnforced),
        ] {
            let e = fully_enforced(4, st).unwrap_err();
            assert!(
                matches!(&e, SandboxError::NotEnforced(4, s) if *s == want),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains("not fully enforced on a kernel with ABI 4"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_missing_path_is_refused_before_any_rule() {
        if kernel_abi() <= 0 {
            // Without Landlock, apply() reports None before looking at paths.
            let plan = Plan {
                read_only: vec![PathBuf::from("/nonexistent/tvw")],
                ..Plan::default()
            };
            assert!(apply(&plan).unwrap().is_none());
            return;
        }
        // Safe in the test process: the path check comes before any
        // ruleset is created, let alone applied.
        let plan = Plan {
            read_only: vec![PathBuf::from("/etc"), PathBuf::from("/nonexistent/tvw")],
            ..Plan::default()
        };
        match apply(&plan) {
            Err(SandboxError::MissingPath(p)) => assert_eq!(p, PathBuf::from("/nonexistent/tvw")),
            other => panic!("{other:?}"),
        }
    }
}
