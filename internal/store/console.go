package store

import (
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// The console's reads: pages of instances with their verdicts, sorted and
// filtered in SQL so that a page of 10,000 costs one page's rows; counts
// for the fleet; verdict changes by hour.

// InstanceSort is a column the console sorts instances by.
type InstanceSort string

// The sorts, each ending on the instance id so that pages are stable.
const (
	SortInstance InstanceSort = "instance"
	SortProject  InstanceSort = "project"
	SortPhase    InstanceSort = "phase"
	SortVersion  InstanceSort = "version"
	SortHost     InstanceSort = "host"
	SortVerdict  InstanceSort = "verdict"
	SortPolicy   InstanceSort = "policy"
	SortEvidence InstanceSort = "evidence"
)

// sortColumns are the sorts' columns of the vtpms row v, each indexed
// with the instance id (migrations 1, 29, 31). A shelved vTPM has no host
// (NULL), which sorts as "" so that it has a place in the order on
// either engine (an index on the expression).
var sortColumns = map[InstanceSort]string{
	SortInstance: "v.instance_id",
	SortProject:  "v.project",
	SortPhase:    "v.phase",
	SortVersion:  "v.version",
	SortHost:     hostSort,
	SortVerdict:  "v.verdict",
	SortPolicy:   "v.policy_name",
	SortEvidence: "v.evidence_at",
}

const hostSort = "COALESCE(v.host, '')"

// ValidSort reports whether s is one of the sorts.
func ValidSort(s InstanceSort) bool { _, ok := sortColumns[s]; return ok }

// InstanceQuery selects a page of instances; empty fields match
// everything.
type InstanceQuery struct {
	Project string
	Host    string
	Phase   Phase
	// Verdict "none" selects instances that never registered.
	Verdict Verdict
	// Policy selects the instances whose policy was copied from a named
	// policy of that name; PolicyID, from that very policy (Policy.ID).
	Policy   string
	PolicyID string
	// Search matches instance ids starting with it.
	Search string
	Sort   InstanceSort // "" sorts by instance id
	Desc   bool
	// After selects the instances after this place in the order (the
	// next page); Before, the last Limit before it (the previous page),
	// still listed in the order. A place is an Instance's Key in a list
	// of the same Sort.
	After, Before *InstanceKey
	Limit         int // 0: no limit
}

// InstanceKey is an instance's place in a sorted list: its value of the
// sort's column, and its id, which breaks ties.
type InstanceKey struct {
	Value      string
	InstanceID string
}

// VerdictNone is InstanceQuery's Verdict for instances with no
// attestation record.
const VerdictNone Verdict = "none"

// Instance is a row of the console's table: what a vTPM's record and its
// attestation record say of it, the vTPM's own columns alone (no key,
// EK or resize document is read or decoded for a page).
type Instance struct {
	InstanceID, Project string
	Phase               Phase
	Version             spec.Version
	Model               spec.Model
	Host                string // "" while shelved
	// Verdict is VerdictNone if it never registered.
	Verdict Verdict
	// Policy and PolicyID name the named policy its attestation copied.
	Policy, PolicyID string
	// EvidenceAt is when its last genuine evidence came, to the minute.
	EvidenceAt time.Time
	// Key is its place in the list it came in (InstanceQuery.After,
	// Before).
	Key InstanceKey
}

// where is q's filter: a WHERE clause ("" for none) and its arguments.
func (q InstanceQuery) where() (string, []any) {
	var where []string
	var args []any
	verdict := string(q.Verdict)
	if q.Verdict == VerdictNone {
		verdict = ""
	}
	for _, c := range []struct {
		col, val string
		set      bool
	}{
		{"project", q.Project, q.Project != ""}, {"host", q.Host, q.Host != ""}, {"phase", string(q.Phase), q.Phase != ""},
		{"verdict", verdict, q.Verdict != ""}, {"policy_name", q.Policy, q.Policy != ""}, {"policy_id", q.PolicyID, q.PolicyID != ""},
	} {
		if c.set {
			where = append(where, "v."+c.col+"=?")
			args = append(args, c.val)
		}
	}
	if q.Search != "" {
		// A range, not LIKE: no wildcard in the search to escape, and it
		// uses the primary key.
		where = append(where, "v.instance_id>=? AND v.instance_id<?")
		args = append(args, q.Search, q.Search+"\U0010FFFF")
	}
	if len(where) == 0 {
		return "", nil
	}
	return " WHERE " + strings.Join(where, " AND "), args
}

// CountInstances counts the instances q's filter selects (its sort and
// place aside): an index-only count of the matches.
func (t *Tx) CountInstances(q InstanceQuery) (int, error) {
	filter, args := q.where()
	var n int
	err := t.queryRow(`SELECT COUNT(*) FROM vtpms v`+filter, args...).Scan(&n)
	return n, err
}

// ListInstances returns the page of instances q selects. Everything it
// filters and sorts by is a column of the vTPM's row, indexed with the
// instance id, and a page starts at a place in that order (keyset
// paging, never an offset): a page costs about its own rows, however
// deep in however many matches.
func (t *Tx) ListInstances(q InstanceQuery) ([]Instance, error) {
	filter, args := q.where()
	col := q.sortColumn()
	// Before walks the order backwards from its place, and the page is
	// turned round after.
	desc, place, from := q.Desc, q.After, ">"
	if q.Before != nil {
		desc, place = !desc, q.Before
	}
	if desc {
		from = "<"
	}
	if place != nil {
		// Row values seek the index to the place itself. SQLite seeks
		// none on an expression's index, so the host's sort seeks to the
		// place's host and steps over that host's instances before it.
		cond := "(" + col + ", v.instance_id) " + from + " (?, ?)"
		placeArgs := []any{place.Value, place.InstanceID}
		switch col {
		case sortColumns[SortInstance]:
			cond, placeArgs = "v.instance_id "+from+" ?", []any{place.InstanceID}
		case hostSort:
			cond = col + " " + from + "= ? AND (" + col + " " + from + " ? OR v.instance_id " + from + " ?)"
			placeArgs = []any{place.Value, place.Value, place.InstanceID}
		}
		if filter == "" {
			filter = " WHERE " + cond
		} else {
			filter += " AND " + cond
		}
		args = append(args, placeArgs...)
	}
	query := `SELECT v.instance_id, v.project, v.phase, v.version, v.model, COALESCE(v.host, ''), v.verdict, v.policy_name, v.policy_id, v.evidence_at, ` +
		col + ` FROM vtpms v` + filter + orderBy(col, desc)
	if q.Limit > 0 {
		query += " LIMIT ?"
		args = append(args, q.Limit)
	}
	rows, err := t.query(query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Instance
	for rows.Next() {
		var in Instance
		var verdict, evidence string
		err := rows.Scan(&in.InstanceID, &in.Project, &in.Phase, &in.Version, &in.Model, &in.Host, &verdict, &in.Policy, &in.PolicyID, &evidence, &in.Key.Value)
		if err != nil {
			return nil, err
		}
		in.Key.InstanceID = in.InstanceID
		in.Verdict = Verdict(verdict)
		if verdict == "" {
			in.Verdict = VerdictNone
		}
		if evidence != "" {
			in.EvidenceAt, _ = time.Parse(time.RFC3339Nano, evidence)
		}
		out = append(out, in)
	}
	if q.Before != nil {
		slices.Reverse(out)
	}
	return out, rows.Err()
}

// sortColumn is the column q sorts by.
func (q InstanceQuery) sortColumn() string {
	if col := sortColumns[q.Sort]; col != "" {
		return col
	}
	return sortColumns[SortInstance]
}

// orderBy is the ORDER BY clause of a list sorted by col, ties broken by
// the instance id the same way.
func orderBy(col string, desc bool) string {
	dir := " ASC"
	if desc {
		dir = " DESC"
	}
	order := " ORDER BY " + col + dir
	if col != sortColumns[SortInstance] {
		order += ", v.instance_id" + dir
	}
	return order
}

// InstanceKeyAt returns the key of the instance at offset (0 for the
// first) in the list q's filter and sort select (its place and limit
// aside), for a page that starts after it (InstanceQuery.After): how the
// console turns to page N without walking the N-1 before. It is an
// OFFSET scan of the same ordered, filtered query, reading only the sort
// column and the id from the index: its cost grows with offset, unlike a
// page's. Past the last instance it returns ErrNotFound.
func (t *Tx) InstanceKeyAt(q InstanceQuery, offset int) (InstanceKey, error) {
	var k InstanceKey
	if offset < 0 {
		return k, fmt.Errorf("instance offset %d is negative", offset)
	}
	filter, args := q.where()
	col := q.sortColumn()
	err := t.queryRow(`SELECT `+col+`, v.instance_id FROM vtpms v`+filter+orderBy(col, q.Desc)+` LIMIT 1 OFFSET ?`,
		append(args, offset)...).Scan(&k.Value, &k.InstanceID)
	if errors.Is(err, sql.ErrNoRows) {
		return k, ErrNotFound
	}
	return k, err
}

// Count is a value and how many have it.
type Count struct {
	Value string
	N     int
}

// CountPhases counts the vTPMs of project ("" for all) by phase.
func (t *Tx) CountPhases(project string) ([]Count, error) {
	q, args := `SELECT phase, COUNT(*) FROM vtpms`, []any{}
	if project != "" {
		q, args = q+` WHERE project=?`, append(args, project)
	}
	return t.counts(q+` GROUP BY phase ORDER BY phase`, args...)
}

// CountVerdicts counts the vTPMs of project ("" for all) by their
// attestation verdict, VerdictNone (last) for those never registered.
func (t *Tx) CountVerdicts(project string) ([]Count, error) {
	q, args := `SELECT verdict, COUNT(*) FROM vtpms`, []any{}
	if project != "" {
		q, args = q+` WHERE project=?`, append(args, project)
	}
	cs, err := t.counts(q+` GROUP BY verdict ORDER BY 1`, args...)
	if len(cs) > 0 && cs[0].Value == "" {
		cs = append(cs[1:], Count{string(VerdictNone), cs[0].N})
	}
	return cs, err
}

// CountPolicyUsers counts, per named policy (by its ID), the instances
// of project ("" for all) whose attestation copied it.
func (t *Tx) CountPolicyUsers(project string) ([]Count, error) {
	q, args := `SELECT policy_id, COUNT(*) FROM vtpms WHERE policy_id != ''`, []any{}
	if project != "" {
		q, args = q+` AND project=?`, append(args, project)
	}
	return t.counts(q+` GROUP BY policy_id ORDER BY 1`, args...)
}

func (t *Tx) counts(q string, args ...any) ([]Count, error) {
	rows, err := t.query(q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Count
	for rows.Next() {
		var c Count
		if err := rows.Scan(&c.Value, &c.N); err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, rows.Err()
}

// VerdictChanges counts the instances' and hosts' verdict changes since
// since, by hour (the hour's start, UTC) and by the verdict changed to.
func (t *Tx) VerdictChanges(since time.Time) (map[time.Time]map[Verdict]int, error) {
	var actions []string
	var args []any
	for _, v := range []Verdict{VerdictPending, VerdictTrusted, VerdictUntrusted, VerdictStale} {
		actions = append(actions, "?")
		args = append(args, "attestation "+string(v))
	}
	args = append(args, stamp(since.Truncate(time.Hour)))
	rows, err := t.query(`SELECT substr(at, 1, 13), action, COUNT(*) FROM events
		WHERE action IN (`+strings.Join(actions, ",")+`) AND at >= ? GROUP BY substr(at, 1, 13), action`, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[time.Time]map[Verdict]int{}
	for rows.Next() {
		var hour, action string
		var n int
		if err := rows.Scan(&hour, &action, &n); err != nil {
			return nil, err
		}
		h, err := time.Parse("2006-01-02T15", hour)
		if err != nil {
			continue
		}
		if out[h] == nil {
			out[h] = map[Verdict]int{}
		}
		out[h][Verdict(strings.TrimPrefix(action, "attestation "))] += n
	}
	return out, rows.Err()
}

// ListPolicyUsers lists the instance ids of project ("" for all) whose
// attestation copied the policy whose ID is policyID, by id, at most
// limit.
func (t *Tx) ListPolicyUsers(project, policyID string, limit int) ([]string, error) {
	q, args := `SELECT instance_id FROM vtpms WHERE policy_id=?`, []any{policyID}
	if project != "" {
		q, args = q+` AND project=?`, append(args, project)
	}
	rows, err := t.query(q+` ORDER BY instance_id LIMIT ?`, append(args, limit)...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		out = append(out, id)
	}
	return out, rows.Err()
}
