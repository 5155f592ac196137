//! The system's users and groups (NSS, through libc): who may use the
//! control socket.

use std::ffi::{CStr, CString};

/// The gid of group `name`, if the system has it.
pub fn gid_of(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all-zero is a valid `struct group` (null pointers, zero id);
    // getgrnam_r fills it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` is as long as we
    // say.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    (r == 0 && !out.is_null()).then_some(grp.gr_gid)
}

/// Whether the user with `uid` is in group `gid` (as primary or
/// supplementary group).
pub fn in_group(uid: u32, gid: u32) -> bool {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all-zero is a valid `struct passwd`; getpwuid_r fills it.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() {
        return false;
    }
    if pw.pw_gid == gid {
        return true;
    }
    // SAFETY: getpwuid_r succeeded, so pw_name points into `buf`, a C
    // string.
    let name = unsafe { CStr::from_ptr(pw.pw_name) };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: `groups` has room for `n` entries; getgrouplist writes at
    // most that many and sets `n` to how many the user has.
    let r = unsafe { libc::getgrouplist(name.as_ptr(), pw.pw_gid, groups.as_mut_ptr(), &mut n) };
    let n = if r < 0 { groups.len() } else { n as usize };
    groups[..n.min(groups.len())].contains(&gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_its_group() {
        assert_eq!(gid_of("root"), Some(0));
        assert_eq!(gid_of("no-such-group-here"), None);
        assert!(in_group(0, 0));
        assert!(!in_group(u32::MAX - 7, 0), "an unknown uid is in no group");
    }
}
