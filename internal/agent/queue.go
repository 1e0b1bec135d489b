package agent

import (
	"context"
	"sync"
)

// queue holds the instance ids waiting to be reconciled, each once however
// often it is added, in the order first added.
type queue struct {
	mu      sync.Mutex
	ids     []string
	pending map[string]bool
	wake    chan struct{} // has a token while ids may be non-empty
}

func (q *queue) init() {
	q.pending = map[string]bool{}
	q.wake = make(chan struct{}, 1)
}

// add queues ids not queued yet.
func (q *queue) add(ids ...string) {
	q.mu.Lock()
	for _, id := range ids {
		if !q.pending[id] {
			q.pending[id] = true
			q.ids = append(q.ids, id)
		}
	}
	q.mu.Unlock()
	q.signal()
}

func (q *queue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// take waits for an id and removes it from the queue; false once ctx ends.
// Whoever takes one while more wait passes the token on, so idle workers
// wake for them.
func (q *queue) take(ctx context.Context) (string, bool) {
	for {
		q.mu.Lock()
		if len(q.ids) > 0 {
			id := q.ids[0]
			q.ids = q.ids[1:]
			delete(q.pending, id)
			more := len(q.ids) > 0
			q.mu.Unlock()
			if more {
				q.signal()
			}
			return id, true
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return "", false
		case <-q.wake:
		}
	}
}

// keyedMutex locks per key, so that one vTPM is reconciled by one worker
// at a time while others proceed.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	sync.Mutex
	users int
}

// lock locks key and returns its unlock.
func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyLock{}
		k.locks[key] = l
	}
	l.users++
	k.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		k.mu.Lock()
		if l.users--; l.users == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}
