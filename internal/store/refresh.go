package store

import (
	"database/sql"
	"errors"
	"time"
)

// Requests for fresh evidence. A caller asks a subject's agent (an
// instance's or a host's, named by its attestation record's key) for
// evidence now rather than at its next interval; the request waits here,
// whichever server took it, until the agent collects it, from whichever
// server its long poll reached.

// AskRefresh records a request for fresh evidence from subject's agent,
// made at; it replaces one still waiting. Its commit closes the channels
// of RefreshAsked.
func (t *Tx) AskRefresh(subject string, at time.Time) error {
	_, err := t.exec(`INSERT INTO refresh_requests (subject, requested_at) VALUES (?,?)
		ON CONFLICT(subject) DO UPDATE SET requested_at=excluded.requested_at`, subject, stamp(at))
	if err == nil {
		t.changed = append(t.changed, topic{kind: refreshTopic, name: subject})
	}
	return err
}

// TakeRefresh collects the request waiting for subject's agent, if any:
// when it was made, and whether there was one. Once taken it is gone.
func (t *Tx) TakeRefresh(subject string) (at time.Time, ok bool, err error) {
	var s string
	err = t.queryRow(`DELETE FROM refresh_requests WHERE subject=? RETURNING requested_at`, subject).Scan(&s)
	if errors.Is(err, sql.ErrNoRows) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, err
	}
	return parseStamp(s), true, nil
}

// RefreshAsked returns a channel that is closed when a transaction next
// commits a request for fresh evidence from subject's agent (AskRefresh):
// take it, then TakeRefresh, and wait on it if there was none. Commits of
// other processes sharing a PostgreSQL database close it too.
func (s *Store) RefreshAsked(subject string) <-chan struct{} {
	return s.wait(topic{kind: refreshTopic, name: subject})
}
