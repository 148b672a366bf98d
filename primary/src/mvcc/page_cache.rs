//! SQLite's own page cache, minus one needless walk over all of it.
//!
//! When SQLite ends a write transaction it drops the cached pages past the
//! end of the database (`xTruncate(dbSize + 1)`). Its page cache skips that
//! when it has never held a page that high, and otherwise walks every
//! cached page. But a b-tree rebalance that swaps two pages parks one of
//! them for a moment under the lock-byte page's number (1 GiB over the
//! page size, plus one: page 262,145 at 4 KiB, past the end of any smaller
//! file), so
//! after most commits of random keys the cache "had" a page there and the
//! truncate walked all of it: with the state's 64 MiB cache (16k pages)
//! that was 4–6% of all of tern-primary's CPU at 100 clients (`perf`,
//! `pcache1TruncateUnsafe`).
//!
//! This wraps SQLite's default page cache (`pcache1`) and forwards every
//! call, keeping its own highest page number, which ignores the lock-byte
//! page: nothing is ever stored there, and a page parked there is renamed
//! again before the rebalance returns. A truncate with nothing at or above
//! its limit is skipped; any other is passed on as before.
//!
//! [`install`] must run before SQLite initializes (the first connection
//! opened in the process); after that SQLite refuses the change and the
//! default cache stays, which is only slower.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};

use rusqlite::ffi;

/// The page number of the lock-byte page: SQLite's `PENDING_BYTE` (1 GiB)
/// over the page size, plus one.
fn lock_page(page_size: c_int) -> c_uint {
    (0x4000_0000 / page_size.max(1) as u32) + 1
}

/// SQLite's default page cache, as SQLite reported it before ours went in.
struct Default(ffi::sqlite3_pcache_methods2);

// SAFETY: the methods are plain function pointers and `pArg` is SQLite's
// own global argument, which it hands to those functions from any thread.
unsafe impl Send for Default {}
unsafe impl Sync for Default {}

static DEFAULT: OnceLock<Default> = OnceLock::new();

/// Whether SQLite took the wrapper.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Truncates skipped because nothing was cached at or above their limit.
static SKIPPED: AtomicU64 = AtomicU64::new(0);

/// Whether [`install`] got in before SQLite initialized.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// How many truncates were answered without the default cache.
pub fn skipped_truncates() -> u64 {
    SKIPPED.load(Ordering::Relaxed)
}

/// One cache: the default one's, and the highest page number it holds.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    lock_page: c_uint,
    max_key: c_uint,
}

/// Puts the wrapper in, once per process; see the module docs.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: SQLITE_CONFIG_GETPCACHE2 writes the current methods into
        // the struct passed; SQLITE_CONFIG_PCACHE2 copies the struct it is
        // given. Both fail harmlessly (SQLITE_MISUSE) once SQLite is
        // initialized.
        unsafe {
            let mut default: ffi::sqlite3_pcache_methods2 = std::mem::zeroed();
            let rc = ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_GETPCACHE2,
                &mut default as *mut ffi::sqlite3_pcache_methods2,
            );
            if rc != ffi::SQLITE_OK || default.xCreate.is_none() {
                tracing::debug!(rc, "SQLite's page cache could not be read; left as it is");
                return;
            }
            if DEFAULT.set(Default(default)).is_err() {
                return;
            }
            let ours = ffi::sqlite3_pcache_methods2 {
                iVersion: 1,
                pArg: std::ptr::null_mut(),
                xInit: Some(x_init),
                xShutdown: Some(x_shutdown),
                xCreate: Some(x_create),
                xCachesize: Some(x_cachesize),
                xPagecount: Some(x_pagecount),
                xFetch: Some(x_fetch),
                xUnpin: Some(x_unpin),
                xRekey: Some(x_rekey),
                xTruncate: Some(x_truncate),
                xDestroy: Some(x_destroy),
                xShrink: Some(x_shrink),
            };
            let rc = ffi::sqlite3_config(
                ffi::SQLITE_CONFIG_PCACHE2,
                &ours as *const ffi::sqlite3_pcache_methods2,
            );
            if rc == ffi::SQLITE_OK {
                INSTALLED.store(true, Ordering::Relaxed);
            } else {
                tracing::debug!(
                    rc,
                    "SQLite already initialized; its page cache left as it is"
                );
            }
        }
    });
}

fn default() -> &'static ffi::sqlite3_pcache_methods2 {
    // Our methods are only installed after DEFAULT is set.
    &DEFAULT.get().expect("page cache methods installed").0
}

/// The wrapper behind a handle SQLite got from [`x_create`].
///
/// # Safety
/// `p` must be a handle [`x_create`] returned and [`x_destroy`] has not
/// freed; SQLite serializes calls on one cache.
unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    unsafe { &mut *(p as *mut Cache) }
}

unsafe extern "C" fn x_init(_arg: *mut c_void) -> c_int {
    let d = default();
    match d.xInit {
        Some(f) => unsafe { f(d.pArg) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn x_shutdown(_arg: *mut c_void) {
    let d = default();
    if let Some(f) = d.xShutdown {
        unsafe { f(d.pArg) }
    }
}

unsafe extern "C" fn x_create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = default().xCreate else {
        return std::ptr::null_mut();
    };
    let inner = unsafe { create(page_size, extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    Box::into_raw(Box::new(Cache {
        inner,
        lock_page: lock_page(page_size),
        max_key: 0,
    })) as *mut ffi::sqlite3_pcache
}

unsafe extern "C" fn x_cachesize(p: *mut ffi::sqlite3_pcache, size: c_int) {
    let c = unsafe { cache(p) };
    if let Some(f) = default().xCachesize {
        unsafe { f(c.inner, size) }
    }
}

unsafe extern "C" fn x_pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    let c = unsafe { cache(p) };
    match default().xPagecount {
        Some(f) => unsafe { f(c.inner) },
        None => 0,
    }
}

unsafe extern "C" fn x_fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let c = unsafe { cache(p) };
    let Some(fetch) = default().xFetch else {
        return std::ptr::null_mut();
    };
    let page = unsafe { fetch(c.inner, key, create) };
    if !page.is_null() && key != c.lock_page {
        c.max_key = c.max_key.max(key);
    }
    page
}

unsafe extern "C" fn x_unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    let c = unsafe { cache(p) };
    if let Some(f) = default().xUnpin {
        unsafe { f(c.inner, page, discard) }
    }
}

unsafe extern "C" fn x_rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    let c = unsafe { cache(p) };
    if let Some(f) = default().xRekey {
        unsafe { f(c.inner, page, old, new) }
    }
    if new != c.lock_page {
        c.max_key = c.max_key.max(new);
    }
}

unsafe extern "C" fn x_truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let c = unsafe { cache(p) };
    // Nothing cached at or above `limit`: the default cache would walk
    // every page to find that out if a page was ever parked at the
    // lock-byte page's number.
    if limit > c.max_key {
        SKIPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if let Some(f) = default().xTruncate {
        unsafe { f(c.inner, limit) }
    }
    c.max_key = limit.saturating_sub(1);
}

unsafe extern "C" fn x_destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: `p` came from `Box::into_raw` in `x_create`, and SQLite calls
    // this once, last.
    let c = unsafe { Box::from_raw(p as *mut Cache) };
    if let Some(f) = default().xDestroy {
        unsafe { f(c.inner) }
    }
}

unsafe extern "C" fn x_shrink(p: *mut ffi::sqlite3_pcache) {
    let c = unsafe { cache(p) };
    if let Some(f) = default().xShrink {
        unsafe { f(c.inner) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_byte_page_is_one_past_a_gibibyte() {
        assert_eq!(lock_page(4096), 262_145);
        assert_eq!(lock_page(65536), 16_385);
    }
}
