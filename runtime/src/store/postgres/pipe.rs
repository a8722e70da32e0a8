//! PostgreSQL's pipelined effects transactions: the events of trusted
//! handlers share an open transaction on one connection and send their
//! statements down it without waiting for each other's replies.
//!
//! Why: a [lane](crate::store::lane) serves one event at a time, from its
//! first statement to its verdict, on a connection that waits for every
//! reply before it sends the next request. A handler that wrote one row
//! drained at about 0.4 of the no-op rate, the lane's round trips being the
//! bound. sqlx cannot pipeline; tokio-postgres sends a request as soon as
//! its future is first polled and matches the replies in order, so many
//! events' statements are in flight on one connection at once:
//!
//! ```text
//! BEGIN                           -- sent by the first member, not awaited
//!   e1: INSERT ...  e2: INSERT ...  e3: UPDATE ...   -- in flight together
//!   e1, e2, e3 kept
//!   -- closed: no new members; the last member to reach its verdict sends
//!   INSERT follow-ups, DELETE e1..e3 fenced by their tokens, fail unless
//!   every row was ours                            -- one statement
//! COMMIT                          -- sent right behind it, not awaited first
//! ```
//!
//! The same rules as SQLite's shared transaction ([`crate::store::shared`])
//! keep each event's view serial:
//! - Only handlers the dispatcher trusts come here: ones whose events were
//!   seen to run at most one statement each, in lanes (see
//!   `dispatch::committer`). The others keep their lanes.
//! - An event whose statement would follow another event's, between two
//!   of its own, is stopped ([`StoreError::Interleaved`]) and everything is
//!   rolled back; its handler goes back to lanes for good.
//! - Any statement error aborts a PostgreSQL transaction, so an event that
//!   fails after writing rolls back everyone: the others run again without
//!   spending a retry, and the failing handler's events get savepoints in
//!   lanes from then on.
//!
//! Order is the whole trick: a request is sent while the state's lock is
//! held ([`send_now`] polls it once), so the order of statements on the
//! wire is the order the lock saw, and a member of a transaction that was
//! rolled back can never send into the next one.
//!
//! Follow-up events wait in memory and are inserted by the commit's one
//! statement. If that insert fails for a reason that is not transient, no
//! event can be blamed, so from then on events with follow-ups use lanes,
//! which insert one event's at a time after such a failure.
//!
//! The commit checks the fence in the same statement that deletes the
//! kept rows: if any row is no longer ours it divides by zero, which
//! aborts the transaction, and the COMMIT pipelined behind it rolls back
//! instead. So the next transaction can open on the same connection while
//! the commit's reply is on its way. There are a few pipes, so that
//! would-be members find an open one while another waits for its running
//! members to reach their verdicts.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::TryStreamExt;
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::BatchColumns;
use crate::event::NewEvent;
use crate::store::lane::{Committed, Kept, Lingers};
use crate::store::{Result, SqlRows, SqlValue, StoreError};

/// Most events kept in one transaction. No savepoints here, so no
/// subtransaction cache to protect (the lanes' limit); the linger ends most
/// transactions first.
pub const MAX_KEPT: usize = 512;

/// Connections. One is busy sending while another waits for its last
/// members' verdicts before it commits; measured at concurrency 16.
pub const PIPES: usize = 2;

/// The sessions' `application_name`, unless the database URL sets one.
pub const APPLICATION_NAME: &str = "outrun effects pipe";

/// Bytes a pipe's socket holds back for company before it writes.
const COALESCE_MAX: usize = 16 * 1024;

/// Prepared statements kept per connection before the cache starts over
/// (handlers that build their SQL text per event would grow it forever).
const PREPARED_MAX: usize = 256;

/// The pipes of one PostgreSQL store.
pub struct Pipes {
    pipes: Vec<Arc<Pipe>>,
    /// A commit's insert of follow-ups failed for a reason that is not
    /// transient: which event's follow-up was at fault cannot be told, so
    /// events with follow-ups go to lanes from now on, where they are
    /// inserted one event at a time once a lane commit fails the same way
    /// (rescheduling the batch again and again would never end).
    emits_refused: Arc<std::sync::atomic::AtomicBool>,
    /// Woken when a pipe opens, closes or connects: would-be members that
    /// found every pipe busy wait here.
    changed: Arc<Notify>,
}

/// One connection and the transaction open on it; see the module docs.
pub struct Pipe {
    config: Arc<tokio_postgres::Config>,
    emits_refused: Arc<std::sync::atomic::AtomicBool>,
    state: Mutex<State>,
    changed: Arc<Notify>,
    /// Wakes the lingerer: a first event was kept, or a member vanished
    /// and left work behind.
    kick: Notify,
}

#[derive(Default)]
struct State {
    conn: Option<Arc<Conn>>,
    /// Which transaction is (or was last) open; members carry theirs.
    epoch: u64,
    phase: Phase,
    /// Members that have not reached their verdict.
    active: usize,
    kept: Vec<Kept>,
    /// The kept events' follow-ups, inserted by the commit.
    emits: BatchColumns,
    /// Statements sent in this transaction: a member whose next statement
    /// finds this moved on since its last one was interleaved.
    sent: u64,
    /// A statement failed: the server aborted the transaction, and only a
    /// rollback ends it.
    failed: bool,
    /// Kept events of transactions rolled back where nobody could
    /// reschedule them (a member's attempt was dropped): the lingerer does.
    orphans: Vec<Kept>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    #[default]
    Idle,
    /// A would-be member is connecting it.
    Connecting,
    Open,
    /// No new members; the last one to reach its verdict commits.
    Closing,
}

/// A connection with its prepared statements.
struct Conn {
    client: Client,
    prepared: Mutex<std::collections::HashMap<Box<str>, Statement>>,
    /// The commit's statement: without follow-ups, with, with traced ones.
    finish: [Statement; 3],
}

/// A commit under way: its requests are sent; this waits for the replies.
pub type Committing = Pin<Box<dyn Future<Output = Committed> + Send>>;

/// After [`Pipe::keep`].
pub enum KeepOutcome {
    /// Waiting for the commit; `first`: the first kept event of the
    /// transaction (start the linger).
    Waiting { first: bool },
    /// This verdict was the last the closed transaction waited for.
    Committing(Committing),
    /// The transaction had been rolled back (another member failed): the
    /// event runs again.
    Lost(Kept),
}

/// After [`Pipe::undo`].
#[derive(Default)]
pub struct Undone {
    /// The whole transaction was rolled back: these kept events run again.
    pub lost: Vec<Kept>,
    /// It was rolled back because this member had written.
    pub rolled_back: bool,
    /// Leaving was the last thing the closed transaction waited for.
    pub committing: Option<Committing>,
}

/// Poll `f` once, which sends a tokio-postgres request (the client sends
/// it at the first poll, in the order of first polls). The caller awaits
/// the reply later, or drops it: the connection reads and discards replies
/// nobody waits for.
fn send_now<'a, F>(f: F) -> Pin<Box<dyn Future<Output = F::Output> + Send + 'a>>
where
    F: Future + Send + 'a,
    F::Output: Send + 'a,
{
    let mut f: Pin<Box<dyn Future<Output = F::Output> + Send + 'a>> = Box::pin(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Box::pin(std::future::ready(v)),
        Poll::Pending => f,
    }
}

/// Send a statement without parameters and forget its reply: any error it
/// meets shows in the replies that follow it.
fn send_simple(conn: &Arc<Conn>, sql: &'static str) {
    let conn = conn.clone();
    drop(send_now(
        async move { conn.client.batch_execute(sql).await },
    ));
}

impl Pipes {
    pub fn new(config: Arc<tokio_postgres::Config>, count: usize) -> Self {
        let changed = Arc::new(Notify::new());
        let emits_refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        Self {
            pipes: (0..count.max(1))
                .map(|_| {
                    Arc::new(Pipe {
                        config: config.clone(),
                        emits_refused: emits_refused.clone(),
                        state: Mutex::new(State::default()),
                        changed: changed.clone(),
                        kick: Notify::new(),
                    })
                })
                .collect(),
            changed,
            emits_refused,
        }
    }

    pub fn pipes(&self) -> &[Arc<Pipe>] {
        &self.pipes
    }

    /// A would-be member for an event of `handler`: it joins an open
    /// transaction at its first statement, or at its verdict.
    pub fn enter(self: &Arc<Self>, handler: Arc<str>) -> PipeTx {
        PipeTx {
            all: self.clone(),
            member: None,
            last: None,
            interleaved: false,
            handler,
            wrote: false,
            poisoned: false,
            culprit: false,
            transient: false,
            settled: false,
        }
    }
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Held for a few sends at most; a panic in one left nothing the
        // commit's own checks would not catch.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member's event succeeded: keep it and its follow-ups (see
    /// [`follow_ups`]) for the commit.
    pub fn keep(&self, mut tx: PipeTx, kept: Kept, follow_ups: FollowUps) -> KeepOutcome {
        debug_assert!(tx.is_of(self), "kept on another pipe");
        tx.settled = true;
        let mut s = self.lock();
        if !tx.is_member(&s) {
            return KeepOutcome::Lost(kept);
        }
        // Kept even if the transaction failed meanwhile: the last member
        // out rolls it back and hands every kept event back to run again.
        s.active -= 1;
        if kept.grouped || s.kept.len() + 1 >= MAX_KEPT {
            s.phase = Phase::Closing;
        }
        s.kept.push(kept);
        s.emits.append(follow_ups.0);
        if s.phase == Phase::Closing && s.active == 0 {
            return KeepOutcome::Committing(self.commit(s));
        }
        KeepOutcome::Waiting {
            first: s.kept.len() == 1,
        }
    }

    /// A member's event failed: if it sent anything, roll back the whole
    /// transaction (see the module docs); otherwise it just leaves. In a
    /// transaction a statement failed in, everyone just leaves and the
    /// last one out rolls it back: the members' replies arrive in order but
    /// their tasks run in any order, so the first to hear of the failure
    /// may be one whose statement merely followed the failing one, and the
    /// failing member must still find itself a member to be told apart.
    pub fn undo(&self, mut tx: PipeTx) -> Undone {
        debug_assert!(tx.is_of(self), "undone on another pipe");
        tx.settled = true;
        let mut s = self.lock();
        if !tx.is_member(&s) {
            return Undone::default();
        }
        if s.failed {
            let committing = leave(&mut s).then(|| self.commit(s));
            return Undone {
                lost: Vec::new(),
                rolled_back: tx.culprit,
                committing,
            };
        }
        if tx.wrote {
            return Undone {
                lost: self.roll_back(s),
                rolled_back: true,
                committing: None,
            };
        }
        let committing = leave(&mut s).then(|| self.commit(s));
        Undone {
            committing,
            ..Undone::default()
        }
    }

    /// Close the transaction (the linger is over, or shutdown): commit now
    /// if nobody is running in it, else when the last member finishes.
    pub fn close(&self) -> Option<Committing> {
        let mut s = self.lock();
        if !matches!(s.phase, Phase::Open | Phase::Closing) {
            return None;
        }
        s.phase = Phase::Closing;
        (s.active == 0).then(|| self.commit(s))
    }

    /// Start the linger (a first event was kept).
    pub fn start_linger(&self) {
        self.kick.notify_one();
    }

    /// Send the kept events' delete, fenced, and the COMMIT behind it; a
    /// transaction that failed or holds nothing is rolled back instead.
    /// The next transaction may open on the connection at once.
    fn commit(&self, mut s: MutexGuard<'_, State>) -> Committing {
        let kept = std::mem::take(&mut s.kept);
        let emits = std::mem::take(&mut s.emits);
        let failed = std::mem::replace(&mut s.failed, false);
        let had_emits = !emits.ids.is_empty();
        let emits_refused = self.emits_refused.clone();
        s.phase = Phase::Idle;
        s.active = 0;
        let conn = s.conn.clone();
        let replies = match &conn {
            Some(c) if !failed && !kept.is_empty() => Some(send_finish(c, &kept, emits)),
            Some(c) => {
                send_simple(c, "ROLLBACK");
                None
            }
            None => None,
        };
        drop(s);
        self.changed.notify_waiters();
        Box::pin(async move {
            let r = match replies {
                Some((finish, commit)) => match (finish.await, commit.await) {
                    (Err(e), _) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
                        Err(StoreError::LeaseLost)
                    }
                    (Err(e), _) | (Ok(_), Err(e)) => {
                        let e = StoreError::Pg(e);
                        if had_emits && !e.is_transient() {
                            tracing::warn!(error = %e, "a commit of shared effects with follow-up events failed; events with follow-ups use lanes from now on, so the one at fault gets the error");
                            emits_refused.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e)
                    }
                    (Ok(_), Ok(())) => Ok(()),
                },
                // Nothing kept: nothing to lose. A failed transaction's
                // members were told at their statements.
                None if kept.is_empty() => Ok(()),
                // Failed, or its connection was lost.
                None => Err(StoreError::RolledBack),
            };
            (kept, r)
        })
    }

    /// Roll back the open transaction; returns its kept events, which must
    /// run again. Members still running find out at their next statement
    /// or verdict.
    fn roll_back(&self, mut s: MutexGuard<'_, State>) -> Vec<Kept> {
        if let Some(c) = &s.conn {
            send_simple(c, "ROLLBACK");
        }
        let kept = std::mem::take(&mut s.kept);
        s.emits = BatchColumns::default();
        s.phase = Phase::Idle;
        s.active = 0;
        s.failed = false;
        drop(s);
        self.changed.notify_waiters();
        kept
    }

    /// A member's attempt was dropped before its verdict (a timeout, or
    /// shutdown): undo it as [`Pipe::undo`] would, leaving what needs an
    /// await to the lingerer.
    fn abandon(&self, epoch: u64, wrote: bool) {
        let mut s = self.lock();
        if s.epoch != epoch || !matches!(s.phase, Phase::Open | Phase::Closing) {
            return;
        }
        if wrote && !s.failed {
            let lost = self.roll_back(s);
            self.lock().orphans.extend(lost);
        } else if leave(&mut s) {
            s.phase = Phase::Closing;
        } else {
            return;
        }
        self.kick.notify_one();
    }
}

impl BatchColumns {
    /// Add another event's follow-ups (already checked by `push`).
    fn append(&mut self, mut other: BatchColumns) {
        self.ids.append(&mut other.ids);
        self.names.append(&mut other.names);
        self.payloads.append(&mut other.payloads);
        self.groups.append(&mut other.groups);
        self.max_retries.append(&mut other.max_retries);
        self.delays_us.append(&mut other.delays_us);
        self.ttls_us.append(&mut other.ttls_us);
        self.keys.append(&mut other.keys);
        self.traceparents.append(&mut other.traceparents);
    }
}

/// An event's follow-ups, ready to wait for the commit.
pub struct FollowUps(BatchColumns);

/// Check `emitted` (their `max_retry`; the rest was checked when they were
/// emitted) before the event is kept: a follow-up that cannot be inserted
/// is its event's error, not everyone's at the commit.
pub fn follow_ups(emitted: &[NewEvent], default_max_retry: i32) -> Result<FollowUps> {
    let mut cols = BatchColumns::default();
    for ev in emitted {
        cols.push(ev, default_max_retry)?;
    }
    Ok(FollowUps(cols))
}

/// One member fewer; true when that ends the transaction's wait: it is
/// closed (or holds nothing) and nobody is still running in it.
fn leave(s: &mut State) -> bool {
    s.active -= 1;
    s.active == 0 && (s.phase == Phase::Closing || s.kept.is_empty())
}

type Reply<T> =
    Pin<Box<dyn Future<Output = std::result::Result<T, tokio_postgres::Error>> + Send + 'static>>;

/// Send the commit's statement and the COMMIT behind it.
fn send_finish(conn: &Arc<Conn>, kept: &[Kept], emits: BatchColumns) -> (Reply<u64>, Reply<()>) {
    let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) =
        kept.iter().map(|k| (k.lease.id, k.lease.token)).unzip();
    let n = kept.len() as i64;
    let c = conn.clone();
    let finish = if emits.ids.is_empty() {
        let stmt = conn.finish[0].clone();
        send_now(async move {
            let params: [&(dyn ToSql + Sync); 3] = [&ids, &tokens, &n];
            c.client.execute(&stmt, &params).await
        })
    } else {
        let traced = emits.traceparents.iter().any(Option::is_some);
        let stmt = conn.finish[if traced { 2 } else { 1 }].clone();
        send_now(async move {
            let conn = c;
            let c = &emits;
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![
                &c.ids,
                &c.names,
                &c.payloads,
                &c.groups,
                &c.max_retries,
                &c.delays_us,
                &c.ttls_us,
                &c.keys,
            ];
            if traced {
                params.push(&c.traceparents);
            }
            params.extend([&ids as &(dyn ToSql + Sync), &tokens, &n]);
            conn.client.execute(&stmt, &params).await
        })
    };
    let c = conn.clone();
    let commit = send_now(async move { c.client.batch_execute("COMMIT").await });
    (finish, commit)
}

/// The commit's statement: insert the follow-ups (if `emits`, traced or
/// not), delete the kept rows fenced by their tokens, and divide by zero
/// unless every row was ours, which aborts the transaction so that the
/// COMMIT behind it rolls back.
fn finish_sql(emits: Option<bool>) -> String {
    let (insert, first) = match emits {
        None => (String::new(), 1),
        Some(traced) => {
            let sql = super::enqueue_batch_sql(traced);
            let sql = sql
                .strip_suffix("RETURNING id")
                .expect("the batch insert ends in RETURNING id")
                .trim_end()
                .to_string();
            (format!("emitted AS ({sql}),"), if traced { 10 } else { 9 })
        }
    };
    let (ids, tokens, n) = (first, first + 1, first + 2);
    format!(
        "WITH {insert}
         gone AS (DELETE FROM outbox_events
                  WHERE id = ANY(${ids}::uuid[]) AND lock_token = ANY(${tokens}::uuid[])
                    AND retry < max_retry
                  RETURNING 1)
         SELECT 1 / (count(*) = ${n}::int8)::int FROM gone"
    )
}

/// Connect a pipe: asynchronous commit, as the lanes (see
/// `store::lane::lane_settings` for why a crash then means a rerun, never
/// a lost effect), and the commit's statements prepared.
async fn connect(config: &tokio_postgres::Config) -> Result<Conn> {
    connect_session(config)
        .await
        .map_err(StoreError::PipeConnect)
}

async fn connect_session(
    config: &tokio_postgres::Config,
) -> std::result::Result<Conn, tokio_postgres::Error> {
    // One TCP host (the usual URL): the socket is ours, so its writes can
    // be coalesced. Anything else (a Unix socket, several hosts to try)
    // connects as tokio-postgres would, without.
    let tcp = match (config.get_hosts(), config.get_ports()) {
        ([tokio_postgres::config::Host::Tcp(host)], ports) if ports.len() <= 1 => {
            let port = ports.first().copied().unwrap_or(5432);
            let connect = tokio::net::TcpStream::connect((host.as_str(), port));
            match config.get_connect_timeout() {
                Some(t) => tokio::time::timeout(*t, connect).await.ok(),
                None => Some(connect.await),
            }
            .and_then(|r| r.ok())
        }
        _ => None,
    };
    let client = match tcp {
        Some(stream) => {
            // As tokio-postgres sets it: requests go out when flushed.
            stream.set_nodelay(true).ok();
            let (client, connection) = config
                .connect_raw(Coalesced::new(stream), tokio_postgres::NoTls)
                .await?;
            drive(connection);
            client
        }
        None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            drive(connection);
            client
        }
    };
    let settings: String = crate::store::lane::lane_settings()
        .iter()
        .map(|(k, v)| format!("SET {k} = {v}; "))
        .collect();
    client.batch_execute(&settings).await?;
    let finish = [
        client.prepare(&finish_sql(None)).await?,
        client.prepare(&finish_sql(Some(false))).await?,
        client.prepare(&finish_sql(Some(true))).await?,
    ];
    Ok(Conn {
        client,
        prepared: Mutex::default(),
        finish,
    })
}

/// Run a connection's I/O until it ends (its client is dropped, or the
/// server hangs up; members then see the error on their requests).
fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "a pipelined effects connection ended");
        }
    });
}

/// A socket whose flush yields to the runtime once before it writes, so
/// that requests the other tasks are about to send join the same write.
/// tokio-postgres flushes whenever its queue of requests is empty, which
/// with statements arriving one by one from many tasks meant a `send` per
/// statement (0.74 per event at concurrency 16). Measured (PostgreSQL,
/// 30,000 events, `--handler sql`, A/B alternating): a third of the sends,
/// about +10% events/s.
struct Coalesced<S> {
    inner: S,
    buf: Vec<u8>,
    yielded: bool,
}

impl<S> Coalesced<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            yielded: false,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Coalesced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.buf.is_empty() {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        if !self.yielded && self.buf.len() < COALESCE_MAX {
            // Polled again after the tasks ready now have run; the
            // connection first queues whatever requests they sent.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let this = &mut *self;
        while !this.buf.is_empty() {
            match Pin::new(&mut this.inner).poll_write(cx, &this.buf) {
                Poll::Ready(Ok(n)) => {
                    this.buf.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.yielded = true;
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl Lingers for Pipe {
    /// Woken by [`Pipe::start_linger`], or a member that vanished.
    async fn kicked(&self) {
        self.kick.notified().await
    }

    fn take_orphans(&self) -> Vec<Kept> {
        std::mem::take(&mut self.lock().orphans)
    }

    async fn close_now(&self) -> Option<Committed> {
        match self.close() {
            Some(committing) => Some(committing.await),
            None => None,
        }
    }
}

/// An event's membership of a pipe's transaction. Dropped without
/// [`Pipe::keep`] or [`Pipe::undo`] (its attempt was cancelled), it is
/// undone.
pub struct PipeTx {
    all: Arc<Pipes>,
    member: Option<Member>,
    /// [`State::sent`] after its last statement.
    last: Option<u64>,
    interleaved: bool,
    handler: Arc<str>,
    /// It sent a statement (so leaving means rolling back everyone).
    wrote: bool,
    /// A statement of this event failed, or its transaction was rolled
    /// back under it: it must run again whatever its handler decides.
    poisoned: bool,
    /// Its own statement failed and aborted the transaction (not one that
    /// merely followed a failed one).
    culprit: bool,
    transient: bool,
    settled: bool,
}

struct Member {
    pipe: Arc<Pipe>,
    epoch: u64,
    conn: Arc<Conn>,
}

impl PipeTx {
    fn is_member(&self, s: &State) -> bool {
        self.member
            .as_ref()
            .is_some_and(|m| m.epoch == s.epoch && matches!(s.phase, Phase::Open | Phase::Closing))
    }

    /// It joined `pipe`, or none.
    fn is_of(&self, pipe: &Pipe) -> bool {
        self.member
            .as_ref()
            .is_none_or(|m| std::ptr::eq(&*m.pipe, pipe))
    }

    /// Follow-ups may no longer wait for a pipe's commit (see
    /// `Pipes::emits_refused`).
    pub fn emits_refused(&self) -> bool {
        self.all
            .emits_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The pipe it joined, once it did.
    pub fn pipe(&self) -> Option<&Arc<Pipe>> {
        self.member.as_ref().map(|m| &m.pipe)
    }

    pub fn handler(&self) -> &Arc<str> {
        &self.handler
    }

    /// See [`crate::store::lane::Lane::must_rerun`].
    pub fn must_rerun(&self) -> bool {
        self.poisoned
    }

    /// The event hit a transient database error (or lost its transaction
    /// to another member's failure): its failure is not its fault.
    pub fn saw_transient(&self) -> bool {
        self.transient
    }

    /// Another event's statement ran between two of this event's.
    pub fn was_interleaved(&self) -> bool {
        self.interleaved
    }

    /// Become a member of an open transaction now if it is not one yet:
    /// an open pipe's, else an idle pipe's that it opens (connecting it
    /// first if need be), else it waits for a pipe to change.
    pub async fn join(&mut self) -> Result<()> {
        while self.member.is_none() {
            let all = self.all.clone();
            let notified = all.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(connect) = self.try_join() {
                self.connect(connect).await?;
                continue;
            }
            if self.member.is_none() {
                notified.await;
            }
        }
        Ok(())
    }

    /// One pass over the pipes: join an open transaction, or open one on
    /// an idle connected pipe. Returns a pipe to connect if only an
    /// unconnected idle one was found (its phase is then `Connecting`).
    fn try_join(&mut self) -> Option<Arc<Pipe>> {
        let all = self.all.clone();
        for pipe in &all.pipes {
            let mut s = pipe.lock();
            if s.phase == Phase::Open
                && let Some(conn) = s.conn.clone()
            {
                s.active += 1;
                self.member = Some(Member {
                    pipe: pipe.clone(),
                    epoch: s.epoch,
                    conn,
                });
                return None;
            }
        }
        for pipe in &all.pipes {
            let mut s = pipe.lock();
            if s.phase != Phase::Idle {
                continue;
            }
            if s.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
                // It died between transactions: connect again.
                s.conn = None;
            }
            let Some(conn) = s.conn.clone() else {
                s.phase = Phase::Connecting;
                return Some(pipe.clone());
            };
            // Behind the last transaction's COMMIT or ROLLBACK on the wire;
            // its reply is not awaited: if it fails, so do the statements
            // that follow it.
            send_simple(&conn, "BEGIN");
            s.epoch += 1;
            s.phase = Phase::Open;
            s.active = 1;
            s.sent = 0;
            s.failed = false;
            self.member = Some(Member {
                pipe: pipe.clone(),
                epoch: s.epoch,
                conn,
            });
            drop(s);
            pipe.changed.notify_waiters();
            return None;
        }
        None
    }

    async fn connect(&mut self, pipe: Arc<Pipe>) -> Result<()> {
        // Cancelled or failed: let the next one try.
        struct Connecting<'a>(Option<&'a Pipe>);
        impl Drop for Connecting<'_> {
            fn drop(&mut self) {
                if let Some(pipe) = self.0 {
                    pipe.lock().phase = Phase::Idle;
                    pipe.changed.notify_waiters();
                }
            }
        }
        let mut guard = Connecting(Some(&pipe));
        let conn = connect(&pipe.config).await;
        guard.0 = None;
        let mut s = pipe.lock();
        s.phase = Phase::Idle;
        let r = conn.map(|c| s.conn = Some(Arc::new(c)));
        drop(s);
        pipe.changed.notify_waiters();
        r.inspect_err(|e| self.transient |= e.is_transient())
    }

    fn member(&self) -> &Member {
        self.member.as_ref().expect("joined")
    }

    /// The statement, prepared on the member's connection (once per
    /// connection: sent in order like a statement, since a Parse that
    /// fails aborts the transaction too).
    async fn prepared(&mut self, sql: &str) -> Result<Statement> {
        let m = self.member();
        if let Some(s) = m.conn.prepared.lock().expect("prepared lock").get(sql) {
            return Ok(s.clone());
        }
        let reply = {
            let s = m.pipe.lock();
            if !self.is_member(&s) || s.failed {
                drop(s);
                return Err(self.lost());
            }
            let conn = m.conn.clone();
            let text = sql.to_string();
            send_now(async move { conn.client.prepare(&text).await })
        };
        match reply.await {
            Ok(stmt) => {
                let mut cache = self.member().conn.prepared.lock().expect("prepared lock");
                if cache.len() >= PREPARED_MAX {
                    cache.clear();
                }
                cache.insert(sql.into(), stmt.clone());
                Ok(stmt)
            }
            Err(e) => Err(self.failed(e, super::pipe_prepare_error)),
        }
    }

    /// Run a handler's statement in the transaction; its rows and the
    /// rows it affected.
    async fn run(
        &mut self,
        sql: &str,
        params: &[SqlValue],
    ) -> Result<(Statement, Vec<tokio_postgres::Row>, u64)> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        self.join().await?;
        let stmt = self.prepared(sql).await?;
        // Converted before anything is sent: a value that does not fit is
        // the handler's error and costs no one else anything.
        let args = super::params::convert_for_pipe(stmt.params(), params)?;
        let reply = {
            let m = self.member();
            let mut s = m.pipe.lock();
            if !self.is_member(&s) || s.failed {
                drop(s);
                return Err(self.lost());
            }
            if self.last.is_some_and(|n| n != s.sent) {
                // What it read or wrote before may have changed under it:
                // only a rollback of everyone and a rerun make that right.
                drop(s);
                self.interleaved = true;
                self.poisoned = true;
                return Err(StoreError::Interleaved);
            }
            s.sent += 1;
            let sent = s.sent;
            let conn = m.conn.clone();
            let stmt = stmt.clone();
            let reply = send_now(async move {
                let stream = conn.client.query_raw(&stmt, args.iter()).await?;
                tokio::pin!(stream);
                let mut rows = Vec::new();
                while let Some(row) = stream.try_next().await? {
                    rows.push(row);
                }
                Ok::<_, tokio_postgres::Error>((rows, stream.rows_affected().unwrap_or(0)))
            });
            drop(s);
            self.last = Some(sent);
            self.wrote = true;
            reply
        };
        match reply.await {
            Ok((rows, affected)) => Ok((stmt, rows, affected)),
            Err(e) => Err(self.failed(e, StoreError::Pg)),
        }
    }

    /// A request of this member failed. Any error aborts a PostgreSQL
    /// transaction, so it is poisoned; the error is its own unless the
    /// transaction was already aborted or gone.
    fn failed(
        &mut self,
        e: tokio_postgres::Error,
        own: impl FnOnce(tokio_postgres::Error) -> StoreError,
    ) -> StoreError {
        self.poisoned = true;
        self.wrote = true;
        let m = self.member();
        let mut s = m.pipe.lock();
        let mine = self.is_member(&s);
        let already = e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION);
        if mine {
            s.failed = true;
            // No new members for a transaction that can only roll back.
            s.phase = Phase::Closing;
            if e.is_closed() {
                // Reconnect at the next open.
                s.conn = None;
            }
        }
        drop(s);
        self.culprit = mine && !already;
        let e = if self.culprit {
            own(e)
        } else {
            StoreError::RolledBack
        };
        self.transient |= e.is_transient();
        e
    }

    /// Its transaction is gone (rolled back with another member's
    /// failure) or doomed: it runs again.
    fn lost(&mut self) -> StoreError {
        self.poisoned = true;
        self.transient = true;
        StoreError::RolledBack
    }

    pub async fn query(&mut self, statement: &str, params: &[SqlValue]) -> Result<SqlRows> {
        let (stmt, rows, _) = self.run(statement, params).await?;
        super::pipe_rows(&stmt, &rows)
    }

    pub async fn execute(&mut self, statement: &str, params: &[SqlValue]) -> Result<u64> {
        Ok(self.run(statement, params).await?.2)
    }
}

impl Drop for PipeTx {
    fn drop(&mut self) {
        if !self.settled
            && let Some(m) = &self.member
        {
            m.pipe.abandon(m.epoch, self.wrote);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;
    use std::time::Duration;

    use super::*;
    use crate::event::Lease;
    use crate::store::Store;

    /// A database of its own on the test server, migrated, with `n` claimed
    /// events and a table `t`; dropped by [`Db::drop_now`].
    struct Db {
        name: String,
        store: Store,
        pipes: Arc<Pipes>,
        leases: Vec<Lease>,
    }

    async fn setup(n: usize) -> Db {
        let admin_url = super::super::test_db::url();
        let name = format!("outrun_pipe_{}", Uuid::new_v4().simple());
        let mut admin = super::super::test_db::sqlx_conn().await;
        sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&name);
        let store = Store::connect(url.as_str(), &Default::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let Store::Postgres(s) = &store else {
            unreachable!()
        };
        sqlx::query("CREATE TABLE t (k BIGINT PRIMARY KEY)")
            .execute(s.pool())
            .await
            .unwrap();
        let events: Vec<NewEvent> = (0..n).map(|_| NewEvent::new("e", "{}")).collect();
        store.enqueue_batch(&events, 5).await.unwrap();
        let leases = store
            .claim("w", n, Duration::from_secs(60), &[])
            .await
            .unwrap()
            .iter()
            .map(|c| c.lease())
            .collect();
        let pipes = Arc::new(Pipes::new(
            Arc::new(tokio_postgres::Config::from_str(url.as_str()).unwrap()),
            PIPES,
        ));
        Db {
            name,
            store,
            pipes,
            leases,
        }
    }

    impl Db {
        /// Committed rows of `t`, and events left, as another connection
        /// sees them.
        async fn committed(&self) -> (Vec<i64>, i64) {
            let Store::Postgres(s) = &self.store else {
                unreachable!()
            };
            let rows = sqlx::query_scalar("SELECT k FROM t ORDER BY k")
                .fetch_all(s.pool())
                .await
                .unwrap();
            let events = sqlx::query_scalar("SELECT count(*) FROM outbox_events")
                .fetch_one(s.pool())
                .await
                .unwrap();
            (rows, events)
        }

        async fn drop_now(self) {
            let Db { name, store, .. } = self;
            drop(store);
            let mut admin = super::super::test_db::sqlx_conn().await;
            sqlx::Executor::execute(
                &mut admin,
                format!("DROP DATABASE {name} WITH (FORCE)").as_str(),
            )
            .await
            .unwrap();
        }
    }

    fn kept(lease: Lease) -> Kept {
        Kept {
            lease,
            grouped: false,
            emitted: false,
            done: None,
        }
    }

    async fn write(tx: &mut PipeTx, k: i64) -> Result<u64> {
        tx.execute("INSERT INTO t (k) VALUES ($1)", &[SqlValue::Int(k)])
            .await
    }

    fn keep(tx: PipeTx, lease: Lease) -> KeepOutcome {
        let pipe = tx.pipe().expect("joined").clone();
        pipe.keep(tx, kept(lease), follow_ups(&[], 5).unwrap())
    }

    #[tokio::test]
    async fn a_flush_yields_once_then_writes_everything_queued_in_one_go() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let mut sock = Coalesced::new(near);
        sock.write_all(b"first ").await.unwrap();
        let mut flush = Box::pin(async {
            sock.flush().await.unwrap();
            sock
        });
        assert!(futures::poll!(flush.as_mut()).is_pending(), "yields first");
        let mut sock = flush.await;
        let mut got = vec![0; 64];
        let n = far.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"first ");
        // A second request joins the first when it arrives before the
        // flush has had its yield.
        sock.write_all(b"a ").await.unwrap();
        sock.write_all(b"b").await.unwrap();
        sock.flush().await.unwrap();
        let n = far.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"a b");
        // Nothing is held back at shutdown.
        sock.write_all(b"end").await.unwrap();
        sock.shutdown().await.unwrap();
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"end");
    }

    #[tokio::test]
    async fn members_pipeline_their_statements_and_commit_together() {
        let db = setup(3).await;
        let mut members: Vec<PipeTx> = (0..3).map(|_| db.pipes.enter("h".into())).collect();
        // All three in flight at once on one connection.
        let results = futures::future::join_all(
            members
                .iter_mut()
                .enumerate()
                .map(|(k, m)| write(m, k as i64)),
        )
        .await;
        assert!(results.iter().all(|r| matches!(r, Ok(1))), "{results:?}");
        let pipe = members[0].pipe().unwrap().clone();
        assert!(
            members
                .iter()
                .all(|m| Arc::ptr_eq(m.pipe().unwrap(), &pipe))
        );
        let mut outcomes = Vec::new();
        for (m, lease) in members.into_iter().zip(&db.leases) {
            outcomes.push(keep(m, *lease));
        }
        assert!(matches!(outcomes[0], KeepOutcome::Waiting { first: true }));
        assert_eq!(
            db.committed().await,
            (vec![], 3),
            "nothing before the commit"
        );
        let (kept, r) = pipe.close().expect("nobody is running").await;
        r.unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(db.committed().await, (vec![0, 1, 2], 0));
        db.drop_now().await;
    }

    #[tokio::test]
    async fn a_failing_statement_rolls_back_everyone_and_the_pipe_carries_on() {
        let db = setup(4).await;
        let mut a = db.pipes.enter("h".into());
        write(&mut a, 1).await.unwrap();
        let pipe = a.pipe().unwrap().clone();
        assert!(matches!(keep(a, db.leases[0]), KeepOutcome::Waiting { .. }));
        let mut b = db.pipes.enter("h".into());
        let mut c = db.pipes.enter("h".into());
        // b's duplicate key aborts the transaction for everyone, and c's
        // statement, sent right behind it, fails for that. c's task hears
        // of it first: it must not take the blame, nor end the
        // transaction before b can tell that the failure was its own.
        let mut failing = Box::pin(write(&mut b, 1));
        let polled = futures::poll!(failing.as_mut());
        assert!(polled.is_pending(), "sent, not {polled:?}");
        let e = write(&mut c, 4).await.unwrap_err();
        assert!(matches!(e, StoreError::RolledBack), "{e}");
        assert!(c.must_rerun() && c.saw_transient());
        let e = failing.await.unwrap_err();
        assert!(matches!(e, StoreError::Pg(_)) && !e.is_transient(), "{e}");
        assert!(b.must_rerun() && !b.saw_transient());
        // No one joins a transaction that can only roll back.
        let mut late = db.pipes.enter("h".into());
        late.join().await.unwrap();
        let other = late.pipe().unwrap().clone();
        assert!(!Arc::ptr_eq(&other, &pipe));
        other.undo(late);
        let undone = pipe.undo(c);
        assert!(!undone.rolled_back, "c only followed b's failure");
        assert!(undone.committing.is_none(), "b is still in it");
        let undone = pipe.undo(b);
        assert!(undone.rolled_back, "b's own statement failed");
        let (kept, r) = undone.committing.expect("b was the last one out").await;
        assert_eq!(kept.len(), 1, "a's kept event runs again");
        assert!(matches!(r, Err(StoreError::RolledBack)), "{r:?}");
        assert_eq!(db.committed().await, (vec![], 4));

        // The next transaction on the same connection commits.
        let mut d = db.pipes.enter("h".into());
        write(&mut d, 4).await.unwrap();
        assert!(Arc::ptr_eq(d.pipe().unwrap(), &pipe));
        keep(d, db.leases[3]);
        let (_, r) = pipe.close().unwrap().await;
        r.unwrap();
        assert_eq!(db.committed().await, (vec![4], 3));
        db.drop_now().await;
    }

    #[tokio::test]
    async fn a_lost_lease_rolls_back_the_whole_commit() {
        let db = setup(2).await;
        let mut a = db.pipes.enter("h".into());
        let mut b = db.pipes.enter("h".into());
        write(&mut a, 1).await.unwrap();
        write(&mut b, 2).await.unwrap();
        let pipe = a.pipe().unwrap().clone();
        keep(a, db.leases[0]);
        keep(b, db.leases[1]);
        // Another runtime took b's event (its lease lapsed).
        let Store::Postgres(s) = &db.store else {
            unreachable!()
        };
        sqlx::query("UPDATE outbox_events SET lock_token = gen_random_uuid() WHERE id = $1")
            .bind(db.leases[1].id)
            .execute(s.pool())
            .await
            .unwrap();
        let (kept, r) = pipe.close().unwrap().await;
        assert!(matches!(r, Err(StoreError::LeaseLost)), "{r:?}");
        assert_eq!(kept.len(), 2);
        assert_eq!(db.committed().await, (vec![], 2));
        db.drop_now().await;
    }

    #[tokio::test]
    async fn a_statement_after_another_members_between_two_of_its_own_is_stopped() {
        let db = setup(2).await;
        let mut a = db.pipes.enter("h".into());
        let mut b = db.pipes.enter("h".into());
        write(&mut a, 1).await.unwrap();
        write(&mut b, 2).await.unwrap();
        let e = write(&mut a, 3).await.unwrap_err();
        assert!(matches!(e, StoreError::Interleaved), "{e}");
        assert!(a.was_interleaved() && a.must_rerun());
        // Not interleaved: b's statements follow each other.
        let mut c = db.pipes.enter("h".into());
        write(&mut c, 4).await.unwrap();
        write(&mut c, 5).await.unwrap();
        let pipe = a.pipe().unwrap().clone();
        assert!(pipe.undo(a).rolled_back);
        assert_eq!(db.committed().await, (vec![], 2));
        db.drop_now().await;
    }

    #[tokio::test]
    async fn follow_ups_are_inserted_by_the_commit() {
        let db = setup(1).await;
        let mut a = db.pipes.enter("h".into());
        write(&mut a, 1).await.unwrap();
        let pipe = a.pipe().unwrap().clone();
        let follow_ups = [
            NewEvent::new("next", r#"{"n":1}"#),
            NewEvent::new("next", "{}"),
        ];
        let follow_ups = super::follow_ups(&follow_ups, 5).unwrap();
        assert!(matches!(
            pipe.keep(a, kept(db.leases[0]), follow_ups),
            KeepOutcome::Waiting { first: true }
        ));
        let (_, r) = pipe.close().unwrap().await;
        r.unwrap();
        let Store::Postgres(s) = &db.store else {
            unreachable!()
        };
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM outbox_events ORDER BY seq")
            .fetch_all(s.pool())
            .await
            .unwrap();
        assert_eq!(names, ["next", "next"]);
        assert_eq!(db.committed().await.0, vec![1]);

        // A follow-up whose max_retry does not fit is refused before
        // anything is kept.
        let mut bad = NewEvent::new("next", "{}");
        bad.max_retry = Some(i32::MAX);
        let Err(e) = super::follow_ups(&[bad], 5) else {
            panic!("a max_retry of {} was taken", i32::MAX);
        };
        assert!(!e.is_transient(), "{e}");
        db.drop_now().await;
    }

    #[tokio::test]
    async fn a_commit_whose_follow_ups_fail_sends_follow_ups_to_lanes() {
        let db = setup(1).await;
        let Store::Postgres(s) = &db.store else {
            unreachable!()
        };
        sqlx::query("ALTER TABLE outbox_events ADD CONSTRAINT no_bad CHECK (name <> 'bad')")
            .execute(s.pool())
            .await
            .unwrap();
        let mut a = db.pipes.enter("h".into());
        write(&mut a, 1).await.unwrap();
        assert!(!a.emits_refused());
        let pipe = a.pipe().unwrap().clone();
        let follow_ups = follow_ups(&[NewEvent::new("bad", "{}")], 5).unwrap();
        pipe.keep(a, kept(db.leases[0]), follow_ups);
        let (kept, r) = pipe.close().unwrap().await;
        let e = r.unwrap_err();
        assert!(!e.is_transient(), "{e}");
        assert_eq!(kept.len(), 1);
        assert_eq!(db.committed().await, (vec![], 1), "nothing committed");
        assert!(db.pipes.enter("h".into()).emits_refused());
        db.drop_now().await;
    }

    #[tokio::test]
    async fn a_dropped_member_that_wrote_leaves_its_fellows_to_the_lingerer() {
        let db = setup(2).await;
        let mut a = db.pipes.enter("h".into());
        write(&mut a, 1).await.unwrap();
        let pipe = a.pipe().unwrap().clone();
        keep(a, db.leases[0]);
        let mut b = db.pipes.enter("h".into());
        write(&mut b, 2).await.unwrap();
        drop(b);
        let orphans = pipe.take_orphans();
        assert_eq!(orphans.len(), 1, "a's kept event runs again");
        assert!(pipe.close().is_none(), "rolled back: nothing to commit");
        assert_eq!(db.committed().await, (vec![], 2));
        db.drop_now().await;
    }
}
