//! A map sized by a flag (`--max-services`, `--max-conntrack`, ...) whose pin has another size:
//! on start the agent unpins it, the loader makes a map of the asked size in its place, and the
//! entries are copied over as raw bytes, once before this build's programs are attached and
//! once more after (only keys the new map lacks: what the old programs wrote meanwhile). The
//! copies are of the kernel's own bytes, so no layout knowledge is needed, only equal key and
//! value sizes (not per-CPU maps: none is sized by a flag).

use std::{io, os::fd::AsRawFd as _, os::fd::BorrowedFd};

use super::bpf::{
    BPF_MAP_DELETE_ELEM, BPF_MAP_LOOKUP_BATCH, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM,
    bpf_syscall,
};

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
/// Entries read per BPF_MAP_LOOKUP_BATCH call.
const CHUNK: usize = 4096;
/// Bytes of the batch position (a hash map's bucket index, an array's index: at most a key).
const POSITION_BYTES: usize = 64;

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Entries read from the old map.
    pub read: u64,
    /// Entries written into the new map.
    pub written: u64,
    /// Entries left alone because the new map holds their key already (`only_new`).
    pub present: u64,
    /// Entries the new map did not take (smaller than the old one's content: a full hash map,
    /// an array index past its end).
    pub refused: u64,
}

/// How to copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    /// Keys the new map holds already keep their value. Looked up first: an LRU map takes a
    /// free element (evicting one when full) before it refuses an existing key.
    pub only_new: bool,
    /// Entries whose value is all zeroes are skipped (an array's unused index: the new array
    /// holds zeroes already, and one past its end is no loss).
    pub skip_zero: bool,
}

/// Copies every entry of `from` into `to`, maps of `key_size`-byte keys and `value_size`-byte
/// values, as `mode` says. `written`: each entry written is appended there, its key then its
/// value (for `reconcile`).
pub fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    key_size: u32,
    value_size: u32,
    mode: Mode,
    mut written: Option<&mut Vec<u8>>,
) -> io::Result<Copied> {
    let (key_size, value_size) = (key_size as usize, value_size as usize);
    if key_size == 0 || key_size > POSITION_BYTES || value_size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("key size {key_size}, value size {value_size}"),
        ));
    }
    let mut keys = vec![0u8; CHUNK * key_size];
    let mut values = vec![0u8; CHUNK * value_size];
    let mut position_in = [0u8; POSITION_BYTES];
    let mut position_out = [0u8; POSITION_BYTES];
    let mut first = true;
    let mut copied = Copied::default();
    let mut present = vec![0u8; value_size];
    loop {
        let mut attr = [0u64; 16];
        attr[0] = if first {
            0
        } else {
            position_in.as_ptr() as u64
        };
        attr[1] = position_out.as_mut_ptr() as u64;
        attr[2] = keys.as_mut_ptr() as u64;
        attr[3] = values.as_mut_ptr() as u64;
        attr[4] = (CHUNK as u64) | ((from.as_raw_fd() as u32 as u64) << 32);
        let result = bpf_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // `count` says how many were read, also with ENOENT (the last batch).
        let read = ((attr[4] & 0xffff_ffff) as usize).min(CHUNK);
        let last = match result {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        for i in 0..read {
            let key = &keys[i * key_size..(i + 1) * key_size];
            let value = &values[i * value_size..(i + 1) * value_size];
            copied.read += 1;
            if mode.skip_zero && value.iter().all(|b| *b == 0) {
                continue;
            }
            if mode.only_new && lookup(to, key, &mut present).is_ok() {
                copied.present += 1;
                continue;
            }
            let flags = if mode.only_new { BPF_NOEXIST } else { BPF_ANY };
            match update(to, key, value, flags) {
                Ok(()) => {
                    copied.written += 1;
                    if let Some(written) = written.as_deref_mut() {
                        written.extend_from_slice(key);
                        written.extend_from_slice(value);
                    }
                }
                // Written meanwhile by the new programs.
                Err(e) if mode.only_new && e.raw_os_error() == Some(libc::EEXIST) => {
                    copied.present += 1
                }
                Err(_) => copied.refused += 1,
            }
        }
        if last {
            return Ok(copied);
        }
        position_in = position_out;
        first = false;
    }
}

/// What `reconcile` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Entries the old programs deleted after the first copy, deleted from the new map too.
    pub deleted: u64,
    /// Entries they changed, written again where the new map still held the copy.
    pub updated: u64,
}

/// Brings the entries an earlier copy wrote (`written`: key then value, one after the other)
/// up to date with `from`, where the old programs went on writing after that copy: one `from`
/// no longer holds is deleted from `to` (a socket released, a flow closed); one `from` holds
/// with another value is written again, unless the new programs changed it in `to` already.
/// (A conntrack entry whose count was given back meanwhile must not give it back twice.)
pub fn reconcile(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    written: &[u8],
    key_size: u32,
    value_size: u32,
) -> io::Result<Reconciled> {
    let (key_size, value_size) = (key_size as usize, value_size as usize);
    let mut now = vec![0u8; value_size];
    let mut theirs = vec![0u8; value_size];
    let mut done = Reconciled::default();
    for entry in written.chunks_exact(key_size + value_size) {
        let (key, copied) = entry.split_at(key_size);
        match lookup(from, key, &mut now) {
            Ok(()) if now == copied => {}
            Ok(()) => {
                if lookup(to, key, &mut theirs).is_ok()
                    && theirs == copied
                    && update(to, key, &now, BPF_ANY).is_ok()
                {
                    done.updated += 1;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let mut attr = [0u64; 16];
                attr[0] = to.as_raw_fd() as u32 as u64;
                attr[1] = key.as_ptr() as u64;
                if bpf_syscall(BPF_MAP_DELETE_ELEM, &mut attr).is_ok() {
                    done.deleted += 1;
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The `u64` values of an array map of `entries` entries, by index.
pub fn read_array_u64(map: BorrowedFd<'_>, entries: u32) -> io::Result<Vec<u64>> {
    let mut out = vec![0u64; entries as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let mut value = [0u8; 8];
        lookup(map, &(i as u32).to_ne_bytes(), &mut value)?;
        *slot = u64::from_ne_bytes(value);
    }
    Ok(out)
}

/// Writes `values` into the `u64` array `map` by index, the non-zero ones that fit in its
/// `entries`. Returns how many did not fit.
pub fn write_array_u64(map: BorrowedFd<'_>, entries: u32, values: &[u64]) -> io::Result<u64> {
    let mut lost = 0;
    for (i, v) in values.iter().enumerate().filter(|(_, v)| **v != 0) {
        if i >= entries as usize {
            lost += 1;
            continue;
        }
        update(map, &(i as u32).to_ne_bytes(), &v.to_ne_bytes(), BPF_ANY)?;
    }
    Ok(lost)
}

/// Adds each `(index, delta)` (wrapping: `u64::MAX` is -1) to the `u64` array `map` of
/// `entries` entries (indices past its end are skipped). Not atomic against programs adding
/// at the same moment: a count could miss one change then.
pub fn add_to_array_u64(
    map: BorrowedFd<'_>,
    entries: u32,
    changes: &[(u32, u64)],
) -> io::Result<()> {
    for (i, delta) in changes.iter().filter(|(i, _)| *i < entries) {
        let key = i.to_ne_bytes();
        let mut value = [0u8; 8];
        lookup(map, &key, &mut value)?;
        let sum = u64::from_ne_bytes(value).wrapping_add(*delta);
        update(map, &key, &sum.to_ne_bytes(), BPF_ANY)?;
    }
    Ok(())
}

/// BPF_MAP_LOOKUP_ELEM of one raw key into `value`.
fn lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_mut_ptr() as u64;
    bpf_syscall(BPF_MAP_LOOKUP_ELEM, &mut attr).map(|_| ())
}

/// BPF_MAP_UPDATE_ELEM of one raw key and value.
fn update(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u32 as u64;
    attr[1] = key.as_ptr() as u64;
    attr[2] = value.as_ptr() as u64;
    attr[3] = flags;
    bpf_syscall(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}
