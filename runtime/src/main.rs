// A handler that awaits I/O (a statement's reply, an HTTP response) resumes
// on whichever tokio worker picks it up, so its instance is often freed on
// another thread than the one that allocated it. glibc's malloc then takes
// the other arena's lock: 33-38k futex calls per 40,000 PostgreSQL sql
// events (0.9 per event). jemalloc's thread caches take such frees without
// a lock: 4k futex calls, 6-10% less CPU in outrun for those events, peak
// RSS 30 → 36 MiB; the no-op drain, which never awaits, is unchanged
// (docs/benchmarks-notes.md, session 13).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    outrun::store::sqlite::tune_library();
    outrun::cli::main()
}
