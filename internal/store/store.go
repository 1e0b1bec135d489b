// Package store keeps vtpmd's desired and observed state: hosts, vTPMs and an
// append-only event log, in SQLite (embedded, pure Go) or PostgreSQL (for
// several servers sharing one database). Every access goes through a
// transaction closure: Update commits when the closure returns nil and rolls
// back on an error or a panic; View is read-only. Both engines run the same
// SQL, the same migrations (with PostgreSQL's types) and the same tests.
package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib" // registers the "pgx" driver
	"golang.org/x/sys/unix"
	"modernc.org/sqlite" // registers the "sqlite" driver
	sqlite3 "modernc.org/sqlite/lib"
)

// Store is an open database.
type Store struct {
	db  *sql.DB
	now func() time.Time
	pg  bool // PostgreSQL; else SQLite
	// connWait is how long a transaction waits for a connection
	// (connWait; tests shorten it).
	connWait time.Duration
	// statements counts the SQL statements transactions ran (Statements).
	statements atomic.Int64
	// retries counts transactions run again after losing a serialization
	// conflict on PostgreSQL (Retries).
	retries atomic.Int64

	// On SQLite: writing is the one writer's slot (see takeWriting), kept
	// the statements prepared once and kept on every connection that ran
	// them (see keep), and wrote nudges the checkpointer (see
	// checkpointer).
	writing chan struct{}
	keptMu  sync.Mutex
	kept    map[string]*sql.Stmt
	writes  atomic.Int64
	wrote   chan struct{}

	mu      sync.Mutex
	waiting map[topic]chan struct{} // see VTPMChanged and HostChanged

	// On PostgreSQL: id names this Store in its notifications (notify.go),
	// and listened is closed once its listener first listens.
	id       string
	listened chan struct{}

	// stop ends the store's own goroutine (PostgreSQL's listener, SQLite's
	// checkpointer), which background counts.
	stop       context.CancelFunc
	background sync.WaitGroup
}

// topic is what a waiter waits for a commit to change: one vTPM's record,
// the vTPMs placed on one host, one host's certificates, the refresh
// requests of one attestation subject, or the webhook outbox.
type topic struct {
	kind topicKind
	name string // an instance id (vtpmTopic), a host's name, or an attestation record's key (refreshTopic)
}

type topicKind byte

// The kinds of topic, by their letter in notifications (notify.go).
const (
	vtpmTopic         topicKind = 'v'
	hostTopic         topicKind = 'h'
	certificatesTopic topicKind = 'c'
	refreshTopic      topicKind = 'r'
	outboxTopic       topicKind = 'o' // no name: the one outbox
	fleetTopic        topicKind = 'f' // no name: any vTPM record or event
)

// VTPMChanged returns a channel that is closed when a transaction next
// commits a change to vTPM id's record (made, updated or deleted), so that
// a reader can wait for news instead of polling: take the channel, read,
// and wait on it if what was read is not yet what is wanted. On
// PostgreSQL, commits by other processes sharing the database close it
// too, moments later (notify.go); one may be missed while the store's
// listener reconnects, so a waiter still reads again now and then.
func (s *Store) VTPMChanged(id string) <-chan struct{} {
	return s.wait(topic{kind: vtpmTopic, name: id})
}

// HostChanged returns a channel that is closed when a transaction of this
// Store next commits a change to any vTPM placed on host (created,
// updated, deleted, or moved to or from it): take the channel, then
// WatchVTPMs, and wait on it for the next call. Other processes' commits
// close it as they do VTPMChanged's.
func (s *Store) HostChanged(host string) <-chan struct{} {
	return s.wait(topic{kind: hostTopic, name: host})
}

// HostCertificatesChanged returns a channel that is closed when a
// transaction next commits a revocation of host's certificates, in this
// process or (moments later, as VTPMChanged) another on the database:
// what a cache of honoured certificates waits on.
func (s *Store) HostCertificatesChanged(host string) <-chan struct{} {
	return s.wait(topic{kind: certificatesTopic, name: host})
}

// OutboxChanged returns a channel that is closed when a transaction next
// commits a change to the webhook outbox (a delivery queued, made, or
// released to be retried), in this process or (moments later, as
// VTPMChanged) another on the database: what every server's deliverer
// waits on.
func (s *Store) OutboxChanged() <-chan struct{} {
	return s.wait(topic{kind: outboxTopic})
}

// FleetChanged returns a channel that is closed when a transaction next
// commits a change to any vTPM record or appends any event (a verdict
// change is one), in this process or (moments later, as VTPMChanged)
// another on the database: what the console's live pages wait on.
func (s *Store) FleetChanged() <-chan struct{} {
	return s.wait(topic{kind: fleetTopic})
}

func (s *Store) wait(k topic) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.waiting == nil {
		s.waiting = map[topic]chan struct{}{}
	}
	ch := s.waiting[k]
	if ch == nil {
		ch = make(chan struct{})
		s.waiting[k] = ch
	}
	return ch
}

// committed wakes the waiters on what a transaction changed.
func (s *Store) committed(changed []topic) {
	if len(changed) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range changed {
		if ch := s.waiting[k]; ch != nil {
			close(ch)
			delete(s.waiting, k)
		}
	}
}

// Options tune Open.
type Options struct {
	// Now is the clock for timestamps; default time.Now.
	Now func() time.Time
}

// Open opens (creating if needed) the SQLite database at path and brings its
// schema up to date.
func Open(ctx context.Context, path string, opts Options) (*Store, error) {
	q := url.Values{}
	for _, p := range []string{"busy_timeout(10000)", "journal_mode(WAL)", "foreign_keys(1)", "synchronous(NORMAL)", "wal_autocheckpoint(0)"} {
		q.Add("_pragma", p)
	}
	// WAL with synchronous=NORMAL survives any crash of vtpmd; only a power
	// loss can lose the last commits (a request acknowledged just before it
	// may need repeating). It saves an fsync per transaction. The WAL is
	// copied back into the database by the store's checkpointer, not by
	// whichever commit finds it long (see checkpointer).
	// Writers take the lock when they begin, so two Updates never deadlock
	// upgrading read locks.
	q.Set("_txlock", "immediate")
	f, err := private(path)
	if err != nil {
		return nil, fmt.Errorf("opening store %s: %w", path, err)
	}
	defer f.Close()
	// Replicas opening one new database together would otherwise race to
	// turn on WAL and create the first tables, and SQLite answers such
	// lock upgrades with SQLITE_BUSY at once (its deadlock avoidance),
	// not after the busy timeout. An flock, which on Linux is independent
	// of SQLite's own POSIX locks, serialises the migrations as
	// PostgreSQL's advisory lock does.
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return nil, fmt.Errorf("locking store %s: %w", path, err)
	}
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("opening store %s: %w", path, err)
	}
	// Connections are kept, with their prepared statements, rather than
	// closed whenever more than database/sql's default two were busy.
	db.SetMaxIdleConns(sqliteIdleConns)
	s := newStore(db, false, opts.Now)
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrating store %s: %w", path, err)
	}
	var bg context.Context
	bg, s.stop = context.WithCancel(context.Background())
	s.background.Go(func() { s.checkpointer(bg) })
	return s, nil
}

// Checkpoints: SQLite's own (wal_autocheckpoint) runs in the commit that
// finds the WAL past 1,000 pages, which then copies them into the
// database and syncs it, tens of milliseconds on a busy disk, holding the
// write slot meanwhile: every few hundred key releases one waited for it,
// and the writers queued behind it. The checkpointer does it instead,
// beside the transactions (a passive checkpoint waits for no reader or
// writer, and none waits for it).
const (
	// checkpointWrites is how many written transactions nudge the
	// checkpointer: a few pages each, so about SQLite's 1,000 pages.
	checkpointWrites = 250
	// checkpointEvery is how often it looks for the writes of fewer.
	checkpointEvery = 5 * time.Second
)

// checkpointer copies the WAL back into the SQLite database when
// checkpointWrites transactions wrote, or checkpointEvery after any did,
// until ctx ends.
func (s *Store) checkpointer(ctx context.Context) {
	tick := time.NewTicker(checkpointEvery)
	defer tick.Stop()
	var done int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wrote:
		case <-tick.C:
		}
		if n := s.writes.Load(); n != done {
			// A checkpoint that fails (the disk full, say) leaves the WAL
			// to the next one; the commits in it are safe meanwhile.
			if _, err := s.db.ExecContext(ctx, `PRAGMA wal_checkpoint(PASSIVE)`); err == nil {
				done = n
			}
		}
	}
}

// newStore is a Store on db, of PostgreSQL if pg, else of SQLite, with
// the clock now (nil: time.Now).
func newStore(db *sql.DB, pg bool, now func() time.Time) *Store {
	if now == nil {
		now = time.Now
	}
	s := &Store{db: db, now: now, pg: pg, connWait: connWait}
	if !pg {
		s.writing, s.kept, s.wrote = make(chan struct{}, 1), map[string]*sql.Stmt{}, make(chan struct{}, 1)
	}
	return s
}

// private opens the database file, making it and the journals SQLite may
// have left beside it readable by this user only. SQLite creates its WAL
// and shared memory files with the database file's mode, so a private
// database file made before SQLite opens it keeps them private too.
func private(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if err := os.Chmod(p, 0o600); err != nil && !errors.Is(err, fs.ErrNotExist) {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

// postgresConns is how many connections to PostgreSQL a Store keeps at
// most.
const postgresConns = 20

// sqliteIdleConns is how many idle connections to SQLite a Store keeps
// (each with its page cache and prepared statements); more open while
// busy.
const sqliteIdleConns = 8

// OpenPostgres connects to the PostgreSQL database dsn names (a URL or
// key=value pairs, as libpq takes them) and brings its schema up to date.
// Several servers may share it: every Update is serializable, retried when
// PostgreSQL aborts it for a conflicting one.
func OpenPostgres(ctx context.Context, dsn string, opts Options) (*Store, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening store: %w", err)
	}
	// Hundreds of agents' watches and requests share a bounded, kept pool:
	// unbounded, a burst opened more connections than PostgreSQL allows
	// (100 by default, for every server sharing it) and closed them again.
	db.SetMaxOpenConns(postgresConns)
	db.SetMaxIdleConns(postgresConns)
	s := newStore(db, true, opts.Now)
	s.id, s.listened = newID(), make(chan struct{})
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("migrating store: %w", err)
	}
	var listenCtx context.Context
	listenCtx, s.stop = context.WithCancel(context.Background())
	s.background.Go(func() { s.listen(listenCtx, dsn) })
	return s, nil
}

// Statements is how many SQL statements this Store's transactions have
// run, counting neither BEGIN nor COMMIT: the server's metrics show it, and
// the benchmarks divide it by the work done.
func (s *Store) Statements() int64 { return s.statements.Load() }

// Retries is how many of this Store's transactions ran again because
// another transaction won a serialization conflict (PostgreSQL): a high
// rate says its writers contend for the same rows.
func (s *Store) Retries() int64 { return s.retries.Load() }

// Ping reports whether the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

// Close closes the database.
func (s *Store) Close() error {
	if s.stop != nil {
		s.stop()
		s.background.Wait()
	}
	s.keptMu.Lock()
	for _, st := range s.kept {
		st.Close()
	}
	s.kept = nil
	s.keptMu.Unlock()
	return s.db.Close()
}

// Update runs fn in a read-write transaction.
func (s *Store) Update(ctx context.Context, fn func(*Tx) error) error {
	return s.run(ctx, false, fn)
}

// View runs fn in a read-only transaction.
func (s *Store) View(ctx context.Context, fn func(*Tx) error) error {
	return s.run(ctx, true, fn)
}

// run runs fn in a transaction. On PostgreSQL a serialization failure
// (another transaction won: another server's, or another writer of the
// same host's vTPMs, as they all bump its watch revision) runs it again,
// up to retries times, after a random pause that grows with each try (up
// to maxPause) so that the losers do not collide again: a host's writers
// take turns.
func (s *Store) run(ctx context.Context, readOnly bool, fn func(*Tx) error) error {
	const retries, maxPause = 20, 100 * time.Millisecond
	for try := 1; ; try++ {
		err := s.runOnce(ctx, readOnly, fn)
		var pe *pgconn.PgError
		lost := s.pg && errors.As(err, &pe) && (pe.Code == "40001" || pe.Code == "40P01")
		if lost && try > retries {
			// Other transactions kept winning: the caller may retry later.
			return fmt.Errorf("%w: %w", ErrContended, err)
		}
		if !lost {
			var ue *UnavailableError
			switch {
			case full(err) && !errors.Is(err, ErrFull):
				err = fmt.Errorf("%w: %w", ErrFull, err)
			case unreachable(err) && !errors.As(err, &ue) && ctx.Err() == nil:
				err = &UnavailableError{Err: err}
			}
			return err
		}
		s.retries.Add(1)
		pause := time.NewTimer(rand.N(min(time.Millisecond<<try, maxPause)))
		select {
		case <-ctx.Done():
			pause.Stop()
			return err
		case <-pause.C:
		}
	}
}

// full reports whether err says the database's disk is full, in either
// engine's words.
func full(err error) bool {
	var le *sqlite.Error
	var pe *pgconn.PgError
	switch {
	case errors.Is(err, syscall.ENOSPC):
		return true
	case errors.As(err, &le):
		return le.Code()&0xff == sqlite3.SQLITE_FULL // extended codes keep the primary in the low byte
	case errors.As(err, &pe):
		return pe.Code == "53100" // disk_full
	}
	return false
}

// unreachable reports whether err says the database could not be
// reached: a connection refused, reset or lost, PostgreSQL shutting down,
// starting or out of connection slots (SQLSTATE class 08, 57P01–57P03,
// 53300), a standby refusing a write (25006: the connection string reached
// no primary), no connection in time (connWait), or SQLite locked past its
// busy timeout.
func unreachable(err error) bool {
	var ce *pgconn.ConnectError
	var pe *pgconn.PgError
	var ne net.Error
	var le *sqlite.Error
	switch {
	case errors.As(err, &pe):
		return strings.HasPrefix(pe.Code, "08") || pe.Code == "57P01" || pe.Code == "57P02" || pe.Code == "57P03" || pe.Code == "53300" || pe.Code == "25006"
	case errors.As(err, &le):
		return le.Code()&0xff == sqlite3.SQLITE_BUSY
	}
	return errors.As(err, &ce) || errors.As(err, &ne) || errors.Is(err, errNoConn) ||
		errors.Is(err, driver.ErrBadConn) || errors.Is(err, sql.ErrConnDone) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// connWait bounds how long a transaction waits for its connection: for
// PostgreSQL to accept a new one, or for one of the pool's to come free.
// Past it the store is unavailable (ErrUnavailable), as when down.
const connWait = 10 * time.Second

// errNoConn is a wait for a connection that outlasted Store.connWait.
var errNoConn = errors.New("no database connection came free in time")

// conn takes a connection for one transaction, waiting at most
// s.connWait.
func (s *Store) conn(ctx context.Context) (*sql.Conn, error) {
	wait, cancel := context.WithTimeout(ctx, s.connWait)
	defer cancel()
	c, err := s.db.Conn(wait)
	if err != nil && ctx.Err() == nil && wait.Err() != nil {
		err = fmt.Errorf("%w (%v): %w", errNoConn, s.connWait, err)
	}
	return c, err
}

// takeWriting waits, at most s.connWait, for the SQLite writer's slot,
// which a writing transaction holds until it commits or rolls back.
// SQLite lets one writer in at a time and makes the others poll its lock
// with sleeps (its busy handler sleeps 1, 2, 5 … 100 ms between tries);
// queued here instead, this process's writers go in turn as soon as the
// one before is done. Other processes on the same file still meet
// SQLite's lock (busy_timeout).
func (s *Store) takeWriting(ctx context.Context) error {
	select {
	case s.writing <- struct{}{}:
		return nil
	default:
	}
	wait := time.NewTimer(s.connWait)
	defer wait.Stop()
	select {
	case s.writing <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-wait.C:
		return fmt.Errorf("%w (%v): another transaction of this process kept writing", errNoConn, s.connWait)
	}
}

// begin begins a transaction on a connection of its own. A pooled
// connection found dead before anything was sent (PostgreSQL restarted
// since it was last used) is dropped and another taken, as database/sql
// does for its own calls, so that the first transactions after an outage
// do not fail for the connections it left behind.
func (s *Store) begin(ctx context.Context, opts *sql.TxOptions) (*sql.Tx, *sql.Conn, error) {
	const tries = 3
	for try := 1; ; try++ {
		conn, err := s.conn(ctx)
		if err != nil {
			return nil, nil, fmt.Errorf("connecting: %w", err)
		}
		tx, err := conn.BeginTx(ctx, opts)
		if err == nil {
			return tx, conn, nil
		}
		conn.Close() // a connection that failed is not used again
		if try == tries || !errors.Is(err, driver.ErrBadConn) && !pgconn.SafeToRetry(err) {
			return nil, nil, fmt.Errorf("beginning transaction: %w", err)
		}
	}
}

func (s *Store) runOnce(ctx context.Context, readOnly bool, fn func(*Tx) error) (err error) {
	opts := &sql.TxOptions{ReadOnly: readOnly}
	if s.pg {
		// One snapshot for a whole read; writes as if one at a time.
		opts.Isolation = sql.LevelRepeatableRead
		if !readOnly {
			opts.Isolation = sql.LevelSerializable
		}
	}
	if !s.pg && !readOnly {
		if err := s.takeWriting(ctx); err != nil {
			return err
		}
		defer func() { <-s.writing }()
	}
	sqlTx, conn, err := s.begin(ctx, opts)
	if err != nil {
		return err
	}
	defer conn.Close() // back to the pool
	tx := &Tx{ctx: ctx, tx: sqlTx, now: s.now().UTC(), pg: s.pg, statements: &s.statements, store: s}
	defer func() {
		if p := recover(); p != nil {
			sqlTx.Rollback()
			panic(p)
		}
		if err == nil {
			err = tx.notifyOthers(s.id)
		}
		if err != nil {
			sqlTx.Rollback()
			return
		}
		cerr := sqlTx.Commit()
		switch {
		case cerr == nil:
			s.committed(tx.changed)
			if !s.pg && !readOnly && s.writes.Add(1)%checkpointWrites == 0 {
				select {
				case s.wrote <- struct{}{}:
				default: // the checkpointer has one waiting already
				}
			}
		case unreachable(cerr) && ctx.Err() == nil:
			// Whether PostgreSQL committed before the connection went
			// is unknown.
			err = &UnavailableError{Err: fmt.Errorf("committing transaction: %w", cerr), Committing: true}
		default:
			err = fmt.Errorf("committing transaction: %w", cerr)
		}
	}()
	return fn(tx)
}

// Tx is one transaction. It must not be used after its closure returns.
type Tx struct {
	ctx context.Context
	tx  *sql.Tx
	now time.Time
	pg  bool
	// statements is the Store's count, which every statement advances.
	statements *atomic.Int64
	store      *Store
	changed    []topic // vTPMs and hosts written, for VTPMChanged and HostChanged
	// incarnations are the vTPMs this transaction read or wrote, by
	// instance id: the incarnation it last read, made, updated or deleted
	// (see saw).
	incarnations map[string]string
	// revisions are the hosts whose vTPMs this transaction wrote, each
	// with the watch revision its writes there carry.
	revisions map[string]int64
}

// exec, query and queryRow run one SQL statement (with ? placeholders).
// On SQLite they run it as a statement prepared once and kept (keep); on
// PostgreSQL pgx keeps each connection's prepared statements itself.
func (t *Tx) exec(query string, args ...any) (sql.Result, error) {
	t.statements.Add(1)
	if st := t.keep(query); st != nil {
		return st.ExecContext(t.ctx, args...)
	}
	return t.tx.ExecContext(t.ctx, t.rebind(query), args...)
}

func (t *Tx) query(query string, args ...any) (*sql.Rows, error) {
	t.statements.Add(1)
	if st := t.keep(query); st != nil {
		return st.QueryContext(t.ctx, args...)
	}
	return t.tx.QueryContext(t.ctx, t.rebind(query), args...)
}

func (t *Tx) queryRow(query string, args ...any) *sql.Row {
	t.statements.Add(1)
	if st := t.keep(query); st != nil {
		return st.QueryRowContext(t.ctx, args...)
	}
	return t.tx.QueryRowContext(t.ctx, t.rebind(query), args...)
}

// script runs SQL of several statements (a migration), which is not
// kept.
func (t *Tx) script(ddl string) error {
	t.statements.Add(1)
	_, err := t.tx.ExecContext(t.ctx, ddl)
	return err
}

// maxKept bounds how many distinct statements a SQLite Store keeps
// prepared (as pgx's statement cache does on PostgreSQL); past it, a new
// one runs as before, prepared for the one run. The store's statements
// are its own constant text, save a few with a list of placeholders or
// the filters a caller picked, so the bound is seldom reached.
const maxKept = 512

// keep returns query as a statement of this transaction, prepared once
// per SQLite connection and kept there: SQLite parses and plans a
// statement as it prepares it, which cost more than running the store's
// small statements (a fifth of a key release's CPU), and database/sql
// with modernc's driver prepares again on every call otherwise. It
// returns nil on PostgreSQL, or when the store keeps maxKept already.
func (t *Tx) keep(query string) *sql.Stmt {
	s := t.store
	if s.pg {
		return nil
	}
	s.keptMu.Lock()
	st, full := s.kept[query], s.kept == nil || len(s.kept) >= maxKept
	s.keptMu.Unlock()
	if st == nil && !full {
		// Prepared on another of the pool's connections (SQLite's pool
		// opens one as needed); database/sql prepares it again on this
		// transaction's connection below, and keeps both.
		prepared, err := s.db.PrepareContext(t.ctx, query)
		if err != nil {
			return nil // the statement's own run reports the error
		}
		s.keptMu.Lock()
		if st = s.kept[query]; st == nil && s.kept != nil {
			st, s.kept[query] = prepared, prepared
		}
		s.keptMu.Unlock()
		if st != prepared {
			prepared.Close() // another transaction kept it first, or the store closed
		}
	}
	if st == nil {
		return nil
	}
	return t.tx.StmtContext(t.ctx, st)
}

// rebind turns the ? placeholders (SQLite's) into PostgreSQL's $1, $2, …;
// no query here has a ? anywhere else.
func (t *Tx) rebind(query string) string {
	if !t.pg || !strings.Contains(query, "?") {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// notFound maps sql.ErrNoRows to ErrNotFound.
func notFound(err error) error {
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNotFound
	}
	return err
}
