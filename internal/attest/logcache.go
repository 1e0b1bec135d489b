package attest

import (
	"bytes"
	"container/list"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"unsafe"
)

// LogCache keeps parsed and replayed event logs for evidence to come,
// whoever sends it: instances of one image boot the same firmware log,
// and an instance's every push sends its log again. A hit spares the
// parse and the replay (most of what a bundle costs beyond the signature
// check); everything that depends on the quote, the nonce, the counters
// and the policy is still checked on every bundle, against the cached
// log's replay.
//
// A log is found by a hash of its bytes (maphash, seeded per process:
// cheap, not cryptographic) and confirmed byte for byte, so a collision is
// a miss, never another log's replay. Logs are Logs: pure functions of
// their bytes, nothing of the evidence or the instance that brought them.
// The cache holds at most its bound in bytes (the logs, their events and
// replays), the least recently used evicted first. It is safe for
// concurrent use.
type LogCache struct {
	max  int
	hash func([]byte) uint64

	mu    sync.Mutex
	m     map[uint64]*list.Element // of *cachedLog
	lru   list.List                // most recently used first
	bytes int

	hits, misses atomic.Uint64
}

type cachedLog struct {
	hash uint64
	log  *Log
	size int
}

// LogCacheStats counts a LogCache's lookups and what it holds.
type LogCacheStats struct {
	Hits, Misses uint64 // lookups, since the cache was made
	Logs, Bytes  int    // held now
}

// NewLogCache returns a cache of at most maxBytes of logs.
func NewLogCache(maxBytes int) *LogCache {
	seed := maphash.MakeSeed()
	return newLogCache(maxBytes, func(b []byte) uint64 { return maphash.Bytes(seed, b) })
}

// newLogCache is NewLogCache with the hash given (tests force collisions).
func newLogCache(maxBytes int, hash func([]byte) uint64) *LogCache {
	return &LogCache{max: maxBytes, hash: hash, m: make(map[uint64]*list.Element)}
}

// Lookup returns the log kept with exactly the bytes b, or nil.
func (c *LogCache) Lookup(b []byte) *Log {
	h := c.hash(b)
	c.mu.Lock()
	e, ok := c.m[h]
	if ok && bytes.Equal(e.Value.(*cachedLog).log.raw, b) {
		c.lru.MoveToFront(e)
		c.mu.Unlock()
		c.hits.Add(1)
		return e.Value.(*cachedLog).log
	}
	c.mu.Unlock()
	c.misses.Add(1)
	return nil
}

// Add keeps l, making room by evicting the least recently used logs; a
// log larger than the whole cache is not kept. Another log of the same
// hash is replaced.
func (c *LogCache) Add(l *Log) {
	size := logSize(l)
	if size > c.max {
		return
	}
	h := c.hash(l.raw)
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[h]; ok {
		if bytes.Equal(e.Value.(*cachedLog).log.raw, l.raw) {
			c.lru.MoveToFront(e)
			return
		}
		c.remove(e)
	}
	for c.bytes+size > c.max {
		c.remove(c.lru.Back())
	}
	c.m[h] = c.lru.PushFront(&cachedLog{hash: h, log: l, size: size})
	c.bytes += size
}

func (c *LogCache) remove(e *list.Element) {
	cl := c.lru.Remove(e).(*cachedLog)
	delete(c.m, cl.hash)
	c.bytes -= cl.size
}

// Stats returns the cache's counts.
func (c *LogCache) Stats() LogCacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return LogCacheStats{Hits: c.hits.Load(), Misses: c.misses.Load(), Logs: c.lru.Len(), Bytes: c.bytes}
}

// logSize is what keeping l costs: its bytes, its events (as allocated),
// the Log with its replay, and the cache's own entry (element, map slot).
func logSize(l *Log) int {
	const overhead = int(unsafe.Sizeof(Log{})+unsafe.Sizeof(cachedLog{})+unsafe.Sizeof(list.Element{})) + 32
	return cap(l.raw) + cap(l.events)*int(unsafe.Sizeof(Event{})) + overhead
}
