package store

import (
	"database/sql"
	"fmt"
	"slices"
	"strconv"
	"time"
)

// Watching a host's vTPMs. Every host has a revision, a counter that each
// transaction writing vTPM records of the host bumps once (a row it
// updates and holds locked until it commits, so commits are in revision
// order: a reader that saw revision N has seen every write up to N), and
// every record carries the revision of its last write. A vTPM that leaves
// a host (deleted, or moved away) leaves a tombstone there for
// TombstoneWindow; pruning one raises the host's horizon, below which a
// watcher is told to start over. A watcher of a host with N vTPMs reads
// only what changed since it last looked, never all N.

// TombstoneWindow is how long a host keeps the tombstones of vTPMs that
// left it: a watcher that last looked longer ago than that may be told to
// start over (Changes.Reset).
const TombstoneWindow = 15 * time.Minute

// Tombstone is a vTPM that left a host: deleted, or moved away.
type Tombstone struct {
	InstanceID, Incarnation string
	Revision                int64 // the host's revision when it left
}

// timelineShift places the timeline in a watch token, above a revision of
// at most 2^40 (a host writing a thousand times a second for 34 years).
const timelineShift = 40

// watchToken is the token of revision rev on timeline; 0 while the host
// has no revision, as a watcher's first since is.
func watchToken(timeline, rev int64) int64 {
	if rev == 0 {
		return 0
	}
	return timeline<<timelineShift | rev
}

// Changes is what changed on one host after a watch token.
type Changes struct {
	// Revision is the host's revision now, which the newest of VTPMs
	// carries.
	Revision int64
	// Token is what the watcher holds: the next call's since (Revision,
	// and the database's timeline on PostgreSQL).
	Token int64
	// VTPMs are the host's records written after since, by revision;
	// all of them when Reset.
	VTPMs []*VTPM
	// Gone are the vTPMs that left the host after since and have no
	// record on it now (none when Reset), by revision.
	Gone []Tombstone
	// Reset says since was 0, older than the tombstones the host keeps,
	// newer than Revision (a restored database), or of another timeline
	// (a failover): VTPMs is the whole set, and the watcher drops
	// whatever else it holds.
	Reset bool
	// DriftAsked is the operator's last request for the host's drift
	// (AskDrift), to be answered with repair when DriftRepair; 0 for none.
	DriftAsked  int64
	DriftRepair bool
	// Adoptions are the operator's requests its agent has not answered
	// (AskAdoption).
	Adoptions []Adoption
	// Transfers are the servers' requests to export or import state
	// bundles (AskTransfer) its agent has not answered, without bundles,
	// but those the agent's current run took (TakeTransfer).
	Transfers []Transfer
}

// WatchVTPMs returns what changed on host after watch token since, read
// in one snapshot (it works in View).
func (t *Tx) WatchVTPMs(host string, since int64) (*Changes, error) {
	c := &Changes{}
	var horizon int64
	var repair, adoptions, transfers int
	var walFile string
	// The host's revision and horizon (none before its first vTPM), its
	// drift request not yet answered, if any, whether adoption and
	// transfer requests wait, and the timeline (the first 8 hex digits
	// of the WAL file's name), in one read.
	timeline := `''`
	if t.pg {
		timeline = `pg_walfile_name(pg_current_wal_lsn())`
	}
	err := t.queryRow(`SELECT COALESCE(w.revision, 0), COALESCE(w.horizon, 0), COALESCE(h.drift_asked, 0), COALESCE(h.drift_repair, 0),
		(SELECT COUNT(*) FROM adoptions a WHERE a.host = q.name AND a.answer = ''),
		(SELECT COUNT(*) FROM state_transfers x WHERE x.host = q.name AND `+handedTransfers+`), `+timeline+`
		FROM (SELECT CAST(? AS TEXT) AS name) q
		LEFT JOIN watch_revisions w ON w.host = q.name
		LEFT JOIN hosts h ON h.name = q.name AND h.drift_answered < h.drift_asked`, host).Scan(&c.Revision, &horizon, &c.DriftAsked, &repair, &adoptions, &transfers, &walFile)
	if err != nil {
		return nil, err
	}
	var tl int64
	if walFile != "" {
		if tl, err = strconv.ParseInt(walFile[:min(8, len(walFile))], 16, 64); err != nil {
			return nil, fmt.Errorf("reading the timeline from WAL file name %q: %w", walFile, err)
		}
	}
	c.Token = watchToken(tl, c.Revision)
	c.DriftRepair = repair != 0
	if adoptions > 0 {
		if c.Adoptions, err = t.pendingAdoptions(host); err != nil {
			return nil, err
		}
	}
	if transfers > 0 {
		if c.Transfers, err = t.pendingTransfers(host); err != nil {
			return nil, err
		}
	}
	sinceRev := since & (1<<timelineShift - 1)
	c.Reset = since == 0 || since>>timelineShift != tl || sinceRev < horizon || sinceRev > c.Revision
	since = sinceRev
	if c.Reset {
		since = -1 // every record
	}
	rows, err := t.query(`SELECT `+vtpmColumns+` FROM vtpms WHERE host=? AND revision>? ORDER BY revision, instance_id`, host, since)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		v, err := scanVTPM(rows)
		if err != nil {
			return nil, err
		}
		c.VTPMs = append(c.VTPMs, v)
	}
	if err := rows.Err(); err != nil || c.Reset {
		return c, err
	}
	rows, err = t.query(`SELECT instance_id, incarnation, revision FROM vtpm_tombstones g
		WHERE host=? AND revision>? AND NOT EXISTS (SELECT 1 FROM vtpms v WHERE v.instance_id=g.instance_id AND v.host=g.host)
		ORDER BY revision, instance_id`, host, since)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	for rows.Next() {
		var g Tombstone
		if err := rows.Scan(&g.InstanceID, &g.Incarnation, &g.Revision); err != nil {
			return nil, err
		}
		c.Gone = append(c.Gone, g)
	}
	return c, rows.Err()
}

// revision returns the revision this transaction's writes of host's vTPMs
// carry: the host's next, taken (and its counter row locked) at the first.
// Its watchers wake at the commit.
func (t *Tx) revision(host string) (int64, error) {
	rev, err := t.quietRevision(host)
	if err == nil && !slices.Contains(t.changed, topic{kind: hostTopic, name: host}) {
		t.changed = append(t.changed, topic{kind: hostTopic, name: host})
	}
	return rev, err
}

// quietRevision is revision for a write the host's watchers need not wake
// for: one its own agent made of what it observed (ObserveVTPM), which
// that agent knows already. They read it at their next wake, with what
// else changed.
func (t *Tx) quietRevision(host string) (int64, error) {
	if rev, ok := t.revisions[host]; ok {
		return rev, nil
	}
	var rev int64
	err := t.queryRow(`INSERT INTO watch_revisions (host, revision, horizon) VALUES (?, 1, 0)
		ON CONFLICT (host) DO UPDATE SET revision = watch_revisions.revision + 1 RETURNING revision`, host).Scan(&rev)
	if err != nil {
		return 0, err
	}
	if t.revisions == nil {
		t.revisions = map[string]int64{}
	}
	t.revisions[host] = rev
	return rev, nil
}

// tombstone records that a vTPM left host, and prunes the host's
// tombstones older than TombstoneWindow, raising its horizon.
func (t *Tx) tombstone(host, instanceID, incarnation string) error {
	rev, err := t.revision(host)
	if err != nil {
		return err
	}
	_, err = t.exec(`INSERT INTO vtpm_tombstones (host, instance_id, incarnation, revision, deleted_at) VALUES (?,?,?,?,?)`,
		host, instanceID, incarnation, rev, sortable(t.now))
	if err != nil {
		return err
	}
	var horizon sql.NullInt64
	err = t.queryRow(`SELECT MAX(revision) FROM vtpm_tombstones WHERE host=? AND deleted_at<?`,
		host, sortable(t.now.Add(-TombstoneWindow))).Scan(&horizon)
	if err != nil || !horizon.Valid {
		return err
	}
	// Every tombstone up to the horizon goes, so that those kept are
	// exactly the ones above it.
	if _, err := t.exec(`DELETE FROM vtpm_tombstones WHERE host=? AND revision<=?`, host, horizon.Int64); err != nil {
		return err
	}
	_, err = t.exec(`UPDATE watch_revisions SET horizon=? WHERE host=?`, horizon.Int64, host)
	return err
}
