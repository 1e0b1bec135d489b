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

// keyedMutex locks per key, so that one vTPM is acted on by one worker or
// transfer at a time while others proceed.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	sync.Mutex
	users  int  // holding it or waiting for it
	missed bool // a tryLock found it held since it was last unlocked
}

// lock locks key, waiting for it, and returns its unlock, which reports
// whether a tryLock found key held meanwhile.
func (k *keyedMutex) lock(key string) (unlock func() (missed bool)) {
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
	return k.unlock(key, l)
}

// tryLock locks key if no one holds it or waits for it, and returns its
// unlock (as lock's); false, and the holder's unlock will report it
// missed, if someone does.
func (k *keyedMutex) tryLock(key string) (unlock func() (missed bool), ok bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if l := k.locks[key]; l != nil {
		l.missed = true
		return nil, false
	}
	if k.locks == nil {
		k.locks = map[string]*keyLock{}
	}
	l := &keyLock{users: 1}
	l.Lock()
	k.locks[key] = l
	return k.unlock(key, l), true
}

func (k *keyedMutex) unlock(key string, l *keyLock) func() bool {
	return func() bool {
		k.mu.Lock()
		missed := l.missed
		l.missed = false
		if l.users--; l.users == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
		l.Unlock()
		return missed
	}
}
