//! Process hardening applied first thing in `main`. Landlock comes with the
//! packaging work; see SECURITY.md.

pub mod landlock;
pub mod notify;
pub mod zalloc;

/// No core dumps, not ptrace-attachable by same-uid processes, umask 027.
pub fn harden_process() -> Result<(), String> {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(format!(
                "prctl(PR_SET_DUMPABLE, 0) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
            return Err(format!(
                "setrlimit(RLIMIT_CORE, 0) failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        libc::umask(0o027);
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hardening_sets_what_it_says() {
        super::harden_process().unwrap();
        // SAFETY: reads only.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0), 0);
            let mut r = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            assert_eq!(libc::getrlimit(libc::RLIMIT_CORE, &mut r), 0);
            assert_eq!((r.rlim_cur, r.rlim_max), (0, 0));
            let old = libc::umask(0o022);
            libc::umask(old);
            assert_eq!(old, 0o027);
        }
    }
}
