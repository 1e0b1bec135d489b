package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Wake-ups across processes sharing a PostgreSQL database. A transaction
// that changed what waiters wait for (VTPMChanged, HostChanged, FleetChanged) sends its
// topics with pg_notify before it commits, so PostgreSQL delivers them
// only if it commits, and in commit order; every Store on the database
// listens on a connection of its own and wakes its own waiters, so a
// change one server commits wakes the long polls and agents' watches of
// every other at once. The waiters' periodic rereads stay, as the net for
// notifications lost before a listener first listens or while it
// reconnects (it wakes everyone when it is back).

// notifyChannel is the PostgreSQL notification channel.
const notifyChannel = "vtpmd_changes"

// maxNotify bounds a notification's payload (PostgreSQL allows < 8000
// bytes); a transaction with more topics wakes every waiter instead.
const maxNotify = 7000

// wakeAllTopics is the payload that wakes every waiter.
const wakeAllTopics = "*"

// encodeTopics is the payload for changed, sent by the Store named from:
// "from\nh:HOST\nv:ID\nc:HOST…" (each topic's kind, a colon, its name), or
// from and wakeAllTopics when too long.
func encodeTopics(from string, changed []topic) string {
	var b strings.Builder
	b.WriteString(from)
	for _, t := range changed {
		b.WriteString("\n" + string(rune(t.kind)) + ":" + t.name)
	}
	if b.Len() > maxNotify {
		return from + "\n" + wakeAllTopics
	}
	return b.String()
}

// decodeTopics reads a payload: who sent it, what it changed, and whether
// it wakes everyone.
func decodeTopics(payload string) (from string, changed []topic, all bool) {
	lines := strings.Split(payload, "\n")
	for _, l := range lines[1:] {
		switch {
		case l == wakeAllTopics:
			all = true
		case len(l) >= 2 && l[1] == ':':
			switch k := topicKind(l[0]); k {
			case vtpmTopic, hostTopic, certificatesTopic, refreshTopic, outboxTopic, fleetTopic:
				changed = append(changed, topic{kind: k, name: l[2:]})
			}
		}
	}
	return lines[0], changed, all
}

// notifyOthers sends t's changes to the other processes on the database;
// they arrive only if t commits.
func (t *Tx) notifyOthers(from string) error {
	if !t.pg || len(t.changed) == 0 {
		return nil
	}
	_, err := t.exec(`SELECT pg_notify(?, ?)`, notifyChannel, encodeTopics(from, t.changed))
	return err
}

// listen wakes this Store's waiters for the changes other processes
// commit, until ctx ends, reconnecting after a second when its connection
// fails.
func (s *Store) listen(ctx context.Context, dsn string) {
	first := true
	for ctx.Err() == nil {
		if conn, err := pgx.Connect(ctx, dsn); err == nil {
			if _, err := conn.Exec(ctx, "LISTEN "+notifyChannel); err == nil {
				if first {
					close(s.listened)
					first = false
				} else {
					s.wakeAll() // whatever changed while no one listened
				}
				for {
					n, err := conn.WaitForNotification(ctx)
					if err != nil {
						break
					}
					if from, changed, all := decodeTopics(n.Payload); from != s.id {
						if all {
							s.wakeAll()
						} else {
							s.committed(changed)
						}
					}
				}
			}
			conn.Close(context.WithoutCancel(ctx))
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// wakeAll wakes every waiter.
func (s *Store) wakeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, ch := range s.waiting {
		close(ch)
		delete(s.waiting, k)
	}
}

// newID names a Store among the processes on its database.
func newID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}
