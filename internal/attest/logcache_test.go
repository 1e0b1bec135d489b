package attest

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/vtpmd/vtpmd/internal/attest/attesttest"
)

// hitBench is a registered AK with a quote of the fixture's PCRs 0–7 and
// a policy learned from them: evidence to send with any log.
type hitBench struct {
	ak          *AK
	nonce       []byte
	attest, sig []byte
	pcrs        map[int][]byte
	policy      Policy
}

func newHitBench(t testing.TB) hitBench {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	log, _ := fixture(t)
	pcrs := fixtureValues(t)
	nonce := []byte("0123456789abcdef0123456789abcdef")
	attest, sig := softQuote(t, key, nonce, pcrs)
	return hitBench{ak: benchAK(t, key), nonce: nonce, attest: attest, sig: sig, pcrs: pcrs,
		policy: Learn(Boot{PCRs: pcrs}, log, []int{0, 1, 2, 3, 4, 5, 6, 7})}
}

// checkHitAsMiss holds Verify with a log another instance sent before (a
// copy of b, parsed and kept in c) to Verify parsing b itself: the same
// verdict, the same state. It reports whether there was a hit and what it
// judged.
func (h hitBench) checkHitAsMiss(t testing.TB, c *LogCache, b []byte) (hit bool, v Verdict) {
	t.Helper()
	ev := Evidence{Attest: h.attest, Signature: h.sig, PCRs: h.pcrs, EventLog: b}
	miss, missNext := Verify(h.ak, ev, h.nonce, State{}, &h.policy)
	other, err := ParseLog(slices.Clone(b))
	if err == nil {
		c.Add(other)
	}
	cached := c.Lookup(b)
	if (cached != nil) != (err == nil) || cached != nil && cached != other {
		t.Fatalf("parsed with %v, the cache gives %p, not %p", err, cached, other)
	}
	got, gotNext := Verify(h.ak, ev, h.nonce, State{Log: cached}, &h.policy)
	if !reflect.DeepEqual(got, miss) {
		t.Fatalf("with the cached log: %+v\nparsed anew: %+v", got, miss)
	}
	if !got.Genuine { // both keep the state they were given
		if gotNext.Log != cached || gotNext.Quote != nil || missNext.Log != nil || missNext.Quote != nil {
			t.Fatalf("refused evidence changed the state: %+v, %+v", gotNext, missNext)
		}
		return cached != nil, got
	}
	if !reflect.DeepEqual(gotNext.Quote, missNext.Quote) || (gotNext.Log == nil) != (missNext.Log == nil) {
		t.Fatalf("with the cached log the state is %+v, parsed anew %+v", gotNext, missNext)
	}
	if gotNext.Log != nil {
		if cached != nil && gotNext.Log != cached {
			t.Fatal("the cached log was parsed again")
		}
		if !bytes.Equal(gotNext.Log.Bytes(), missNext.Log.Bytes()) || !reflect.DeepEqual(gotNext.Log.events, missNext.Log.events) || gotNext.Log.replayed != missNext.Log.replayed {
			t.Fatal("the cached log is not the one parsed anew")
		}
	}
	return cached != nil, got
}

// A cached log judges as the log parsed anew, on the real log and on every
// byte of it damaged: those the parse refuses (never cached), those that
// replay to other values than the quote's, those it does not measure.
func TestLogCacheHitJudgesAsMiss(t *testing.T) {
	h := newHitBench(t)
	c := NewLogCache(1 << 20)
	log, _ := fixture(t)
	if hit, v := h.checkHitAsMiss(t, c, log); !hit || !v.Trusted {
		t.Fatalf("the real log: hit %v, %+v", hit, v)
	}
	judged := map[string]int{}
	for i := range log {
		b := slices.Clone(log)
		b[i] ^= 0xff
		hit, v := h.checkHitAsMiss(t, c, b)
		switch {
		case !hit:
			judged["refused"]++
		case v.Trusted:
			judged["trusted"]++
		case !v.Genuine:
			judged["not replayed"]++
		}
	}
	for _, n := range []int{0, 40, len(log) / 2, len(log) - 1} {
		h.checkHitAsMiss(t, c, log[:n])
	}
	if judged["refused"] == 0 || judged["trusted"] == 0 || judged["not replayed"] == 0 {
		t.Fatalf("the damage judged %v: every kind should occur", judged)
	}
}

func FuzzLogCacheHitAsMiss(f *testing.F) {
	log, _ := fixture(f)
	f.Add(log)
	f.Add(longLog(f))
	h := newHitBench(f)
	c := NewLogCache(1 << 20)
	f.Fuzz(func(t *testing.T, b []byte) { h.checkHitAsMiss(t, c, b) })
}

// Two logs of one hash: each is found only with its own bytes, never the
// other's replay, and Verify refuses a log of other bytes a caller hands
// it (it parses the evidence's own).
func TestLogCacheCollision(t *testing.T) {
	h := newHitBench(t)
	c := newLogCache(1<<20, func([]byte) uint64 { return 7 })
	real, _ := fixture(t)
	made, _ := attesttest.EventLog([]attesttest.Measurement{{PCR: 4, Type: 0x80000003, Data: []byte("kernel")}})
	realLog, err := ParseLog(slices.Clone(real))
	if err != nil {
		t.Fatal(err)
	}
	madeLog, err := ParseLog(slices.Clone(made))
	if err != nil {
		t.Fatal(err)
	}
	c.Add(realLog)
	if l := c.Lookup(made); l != nil {
		t.Fatal("another log of the same hash was found")
	}
	if l := c.Lookup(real); l != realLog {
		t.Fatalf("the real log: %p, want %p", l, realLog)
	}
	c.Add(madeLog) // replaces the real log: one per hash
	if l := c.Lookup(real); l != nil {
		t.Fatal("the replaced log was found")
	}
	if l := c.Lookup(made); l != madeLog {
		t.Fatalf("the made-up log: %p, want %p", l, madeLog)
	}
	if s := c.Stats(); s.Logs != 1 || s.Hits != 2 || s.Misses != 2 || s.Bytes != logSize(madeLog) {
		t.Fatalf("stats %+v", s)
	}
	// The real quote with the made-up log's replay handed in: Verify parses
	// the evidence's own log and trusts it.
	ev := Evidence{Attest: h.attest, Signature: h.sig, PCRs: h.pcrs, EventLog: real}
	v, next := Verify(h.ak, ev, h.nonce, State{Log: madeLog}, &h.policy)
	if !v.Trusted || next.Log == madeLog || !bytes.Equal(next.Log.Bytes(), real) {
		t.Fatalf("the real log with another's replay handed in: %+v", v)
	}
	// The made-up log with the real quote does not replay to it, cached or not.
	ev.EventLog = made
	if v, _ := Verify(h.ak, ev, h.nonce, State{Log: c.Lookup(made)}, &h.policy); v.Genuine {
		t.Fatalf("the made-up log: %+v", v)
	}
}

// madeLogs are n distinct logs, parsed.
func madeLogs(t testing.TB, n int) []*Log {
	t.Helper()
	var out []*Log
	for i := range n {
		b, _ := attesttest.EventLog([]attesttest.Measurement{{PCR: 4, Type: 0x80000003, Data: []byte("kernel " + strconv.Itoa(i))}})
		l, err := ParseLog(b)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, l)
	}
	return out
}

// The cache holds no more than its bound, evicting the least recently used.
func TestLogCacheEvicts(t *testing.T) {
	logs := madeLogs(t, 5)
	size := logSize(logs[0])
	c := NewLogCache(3*size + size/2) // room for three
	for _, l := range logs[:3] {
		c.Add(l)
	}
	c.Lookup(logs[0].Bytes()) // 1 is now the least recently used
	c.Add(logs[3])
	for i, want := range []bool{true, false, true, true} {
		if got := c.Lookup(logs[i].Bytes()) != nil; got != want {
			t.Fatalf("log %d kept: %v, want %v", i, got, want)
		}
	}
	if s := c.Stats(); s.Logs != 3 || s.Bytes != 3*size || s.Bytes > c.max {
		t.Fatalf("stats %+v, bound %d", s, c.max)
	}
	c.Add(logs[3]) // again: nothing changes
	if s := c.Stats(); s.Logs != 3 || s.Bytes != 3*size {
		t.Fatalf("the same log twice: %+v", s)
	}
	// A log larger than the whole cache is not kept, nor evicts anything.
	small := NewLogCache(size - 1)
	small.Add(logs[4])
	if s := small.Stats(); s.Logs != 0 || s.Bytes != 0 || small.Lookup(logs[4].Bytes()) != nil {
		t.Fatalf("a log larger than the cache: %+v", s)
	}
}

// Lookups and additions from many goroutines, in a cache that evicts all
// the time, each finding only its own log (go test -race).
func TestLogCacheConcurrent(t *testing.T) {
	logs := madeLogs(t, 8)
	c := NewLogCache(3 * logSize(logs[0]))
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			for n := range 500 {
				l := logs[(g+n)%len(logs)]
				b := slices.Clone(l.Bytes())
				switch got := c.Lookup(b); {
				case got == nil:
					fresh, err := ParseLog(b)
					if err != nil {
						errs <- err
						return
					}
					c.Add(fresh)
				case !bytes.Equal(got.Bytes(), b) || got.replayed != l.replayed:
					errs <- fmt.Errorf("log %d: another log found", (g+n)%len(logs))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if s := c.Stats(); s.Bytes > c.max || s.Hits+s.Misses != 8*500 {
		t.Fatalf("stats %+v, bound %d", s, c.max)
	}
}
