package console

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/refusal"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/tenant"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
)

// PageSize is how many instances a page of the Instances table shows.
const PageSize = 50

// maxTimeline bounds the events an instance's page lists (newest first).
const maxTimeline = 200

var funcs = template.FuncMap{
	"asset": assetURL,
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return t.UTC().Format("2006-01-02 15:04:05Z")
	},
	"iso": func(t time.Time) string { return t.UTC().Format(time.RFC3339) },
	"hex": hex.EncodeToString,
}

// ago says how long before now t was, roughly.
func ago(now, t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	d := now.Sub(t)
	switch {
	case d < time.Minute:
		return strconv.Itoa(int(max(d, 0)/time.Second)) + " s ago"
	case d < time.Hour:
		return strconv.Itoa(int(d/time.Minute)) + " min ago"
	case d < 48*time.Hour:
		return strconv.Itoa(int(d/time.Hour)) + " h ago"
	}
	return strconv.Itoa(int(d/(24*time.Hour))) + " days ago"
}

// caller is v as the domain packages take it.
func (v Viewer) caller() tenant.Caller {
	return tenant.Caller{Project: v.Project, Actor: "console: " + v.Label()}
}

// home sends the operator to the fleet, a tenant to its instances.
func (c *Console) home(q *request) error {
	to := "/ui/instances"
	if q.viewer.Operator() {
		to = "/ui/fleet"
	}
	http.Redirect(q.w, q.r, to, http.StatusSeeOther)
	return nil
}

// hostRow is a host as the fleet page shows it.
type hostRow struct {
	vtpms.Host
	Verdict   verifier.HostVerdict
	Heartbeat string
	UsedPct   int
}

// bar is one hour of the verdict chart: a stacked bar per verdict.
type bar struct {
	X     int
	Hour  time.Time
	Parts []barPart
	Total int
}

type barPart struct {
	Verdict string
	Y, H    int
	N       int
}

// chartHours and chartHeight shape the fleet's chart.
const (
	chartHours  = 24
	chartHeight = 120
	barWidth    = 24
)

// fleet is the operator's page: hosts, counts, verdict changes.
func (c *Console) fleet(q *request) error {
	if !q.viewer.Operator() {
		return refusal.Forbidden(api.CodeForbidden, "The fleet is the operator's; a project sees its instances.")
	}
	ctx := q.ctx()
	now := c.cfg.Now()
	hosts, err := c.cfg.VTPMs.Hosts(ctx, "")
	if err != nil {
		return err
	}
	var names []string
	for _, h := range hosts {
		names = append(names, h.Name)
	}
	verdicts, err := c.cfg.Verifier.HostVerdicts(ctx, names)
	if err != nil {
		return err
	}
	var phases, byVerdict []store.Count
	var changes map[time.Time]map[store.Verdict]int
	err = c.cfg.Store.View(ctx, func(tx *store.Tx) (err error) {
		if phases, err = tx.CountPhases(""); err != nil {
			return err
		}
		if byVerdict, err = tx.CountVerdicts(""); err != nil {
			return err
		}
		changes, err = tx.VerdictChanges(now.Add(-(chartHours - 1) * time.Hour))
		return err
	})
	if err != nil {
		return err
	}
	data := &struct {
		base
		Hosts                []hostRow
		Phases, Verdicts     []store.Count
		Total                int
		Bars                 []bar
		ChartW, ChartH, BarW int
		Changes              int
	}{base: base{Title: "Fleet", Section: "fleet", Viewer: q.viewer, SignedIn: true, Live: true},
		Phases: phases, Verdicts: byVerdict, ChartW: chartHours * barWidth, ChartH: chartHeight, BarW: barWidth - 4}
	for _, h := range hosts {
		row := hostRow{Host: h, Verdict: verdicts[h.Name], Heartbeat: ago(now, h.HeartbeatAt)}
		if h.Capacity > 0 {
			row.UsedPct = 100 * h.Used / h.Capacity
		}
		data.Hosts = append(data.Hosts, row)
	}
	for _, p := range phases {
		data.Total += p.N
	}
	data.Bars, data.Changes = chart(changes, now)
	c.render(q, http.StatusOK, "fleet.html", data)
	return nil
}

// chart lays out the last chartHours hours of verdict changes as stacked
// bars scaled to the busiest hour.
func chart(changes map[time.Time]map[store.Verdict]int, now time.Time) ([]bar, int) {
	first := now.UTC().Truncate(time.Hour).Add(-(chartHours - 1) * time.Hour)
	order := []store.Verdict{store.VerdictUntrusted, store.VerdictStale, store.VerdictPending, store.VerdictTrusted}
	busiest, total := 1, 0
	for _, by := range changes {
		n := 0
		for _, k := range by {
			n += k
		}
		busiest, total = max(busiest, n), total+n
	}
	var bars []bar
	for i := range chartHours {
		h := first.Add(time.Duration(i) * time.Hour)
		b := bar{X: i * barWidth, Hour: h}
		y := chartHeight
		for _, v := range order {
			n := changes[h][v]
			if n == 0 {
				continue
			}
			ht := max(1, n*chartHeight/busiest)
			y -= ht
			b.Parts = append(b.Parts, barPart{Verdict: string(v), Y: y, H: ht, N: n})
			b.Total += n
		}
		bars = append(bars, b)
	}
	return bars, total
}

// column is a sortable column of the Instances table.
type column struct {
	Label string
	Sort  store.InstanceSort
	URL   string
	// Order is the column's aria-sort: ascending, descending or none.
	Order string
}

// instanceRow is an instance as the table shows it: plain strings, so
// that the template walks no embedded struct to find a field (it is most
// of a page's time when it does).
type instanceRow struct {
	ID, Project, Phase, TPM, Host, Verdict, Policy, Evidence string
}

// place is where a page of the Instances table starts or ends, as its
// links carry it (?after=, ?before=): the key of the row it follows or
// precedes in the order, and that row's position in the list, to number
// the rows (a number only: rows that come or go meanwhile shift it).
// Opaque to the browser: base64url of JSON.
type place struct {
	Sort  store.InstanceSort `json:"s"`
	Desc  bool               `json:"d,omitempty"`
	Value string             `json:"v"`
	ID    string             `json:"i"`
	N     int                `json:"n"`
}

func (p place) String() string {
	b, _ := json.Marshal(p)
	return base64.RawURLEncoding.EncodeToString(b)
}

// parsePlace reads a link's place for the table sorted by f; a place of
// another sort, or none at all, is refused.
func parsePlace(s string, f store.InstanceQuery) (*place, error) {
	var p place
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err == nil {
		err = json.Unmarshal(b, &p)
	}
	if err != nil || p.Sort != f.Sort || p.Desc != f.Desc || p.N < 1 {
		return nil, refusal.Invalid(api.CodeInvalidParameter, "This page's link is damaged, or is another order's: start again from the first page.")
	}
	return &p, nil
}

// parsePageNumber reads ?page=: a page number, from 1; "" is none (0).
func parsePageNumber(s string) (int, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return 0, refusal.Invalid(api.CodeInvalidParameter, fmt.Sprintf("%q is not a page number: pages are numbered from 1.", s))
	}
	return n, nil
}

// instances is the table of the viewer's instances: filtered, sorted and
// paged in the store, a page starting after (or ending before) the row
// its link names. ?page=N (a number typed, or a link to page N) finds
// the row page N starts after by an offset into the same order, once,
// and goes on from there by place; a page past the last is the last.
func (c *Console) instances(q *request) error {
	v := q.r.URL.Query()
	f := store.InstanceQuery{Project: q.viewer.Project, Host: v.Get("host"), Phase: store.Phase(v.Get("phase")),
		Verdict: store.Verdict(v.Get("verdict")), Policy: v.Get("policy"), PolicyID: v.Get("policy_id"), Search: strings.TrimSpace(v.Get("q")),
		Sort: store.InstanceSort(v.Get("sort")), Desc: v.Get("dir") == "desc", Limit: PageSize + 1}
	if q.viewer.Operator() {
		f.Project = v.Get("project")
	}
	if !store.ValidSort(f.Sort) {
		f.Sort = store.SortInstance
	}
	var at *place
	pageNo, err := parsePageNumber(v.Get("page"))
	switch {
	case err != nil:
	case pageNo > 0: // ?page= wins over a place
	case v.Get("after") != "":
		at, err = parsePlace(v.Get("after"), f)
		if at != nil {
			f.After = &store.InstanceKey{Value: at.Value, InstanceID: at.ID}
		}
	case v.Get("before") != "":
		at, err = parsePlace(v.Get("before"), f)
		if at != nil {
			f.Before = &store.InstanceKey{Value: at.Value, InstanceID: at.ID}
		}
	}
	if err != nil {
		return err
	}
	var rows []store.Instance
	var total int
	var policy *store.Policy
	err = c.cfg.Store.View(q.ctx(), func(tx *store.Tx) (err error) {
		if total, err = tx.CountInstances(f); err != nil {
			return err
		}
		// Page N starts after row (N-1)·PageSize; past the last page,
		// the last.
		if n := min(pageNo, (total+PageSize-1)/PageSize); n > 1 {
			k, err := tx.InstanceKeyAt(f, (n-1)*PageSize-1)
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
			if err == nil {
				f.After, at = &k, &place{N: (n - 1) * PageSize}
			}
		}
		if rows, err = tx.ListInstances(f); err != nil {
			return err
		}
		if f.Before != nil && len(rows) <= PageSize || f.After != nil && len(rows) == 0 {
			// Nothing before these but themselves, or nothing left after
			// the place (its rows went meanwhile): the first page.
			f.After, f.Before, at = nil, nil, nil
			if rows, err = tx.ListInstances(f); err != nil {
				return err
			}
		}
		if f.PolicyID != "" {
			if policy, err = tx.GetPolicyByID(f.PolicyID); errors.Is(err, store.ErrNotFound) {
				policy, err = nil, nil
			}
		}
		return err
	})
	if err != nil {
		return err
	}
	// A page asks for one row more than it shows, to know whether there
	// is another page that way.
	more := len(rows) > PageSize
	from, hasPrev, hasNext := 1, false, more
	switch {
	case f.After != nil:
		from, hasPrev = at.N+1, true
	case f.Before != nil:
		from, hasPrev, hasNext = max(at.N-PageSize, 1), true, true
		rows = rows[1:]
	}
	rows = rows[:min(len(rows), PageSize)]
	now := c.cfg.Now()
	data := &struct {
		base
		F                 store.InstanceQuery
		PolicyName        string // of F.PolicyID
		Columns           []column
		Rows              []instanceRow
		Total, From, To   int
		First, Prev, Next string
		// Page of Pages is the page shown, counted from its first row;
		// Keep is the query the go-to-page form carries along.
		Page, Pages      int
		Keep             []keptParam
		Phases, Verdicts []string
		ShowProject      bool
	}{base: base{Title: "Instances", Section: "instances", Viewer: q.viewer, SignedIn: true, Live: true},
		F: f, Total: total, ShowProject: q.viewer.Operator(),
		Phases:   []string{"pending", "provisioning", "active", "stopped", "shelving", "shelved", "unshelving", "deleting", "error"},
		Verdicts: []string{"trusted", "untrusted", "stale", "pending", "none"}}
	if policy != nil {
		data.PolicyName = policy.Name
		if policy.Project != "" {
			data.PolicyName += " (project " + policy.Project + ")"
		}
	}
	for _, r := range rows {
		data.Rows = append(data.Rows, instanceRow{ID: r.InstanceID, Project: r.Project, Phase: string(r.Phase),
			TPM: string(r.Version) + " " + string(r.Model), Host: r.Host, Verdict: string(r.Verdict), Policy: r.Policy, Evidence: ago(now, r.EvidenceAt)})
	}
	if len(rows) > 0 {
		data.From, data.To = from, from+len(rows)-1
		data.Page, data.Pages = (from-1)/PageSize+1, max((total+PageSize-1)/PageSize, (from-1)/PageSize+1)
	}
	link := func(change func(url.Values)) string {
		u := url.Values{}
		for k, vs := range v {
			u[k] = slices.Clone(vs)
		}
		u.Del("after")
		u.Del("before")
		u.Del("page")
		change(u)
		return "/ui/instances?" + u.Encode()
	}
	for _, k := range slices.Sorted(maps.Keys(v)) {
		if k != "after" && k != "before" && k != "page" {
			for _, val := range v[k] {
				data.Keep = append(data.Keep, keptParam{k, val})
			}
		}
	}
	if hasPrev {
		data.First = link(func(url.Values) {})
		first := rows[0]
		data.Prev = link(func(u url.Values) {
			u.Set("before", place{Sort: f.Sort, Desc: f.Desc, Value: first.Key.Value, ID: first.InstanceID, N: from}.String())
		})
	}
	if hasNext && len(rows) > 0 {
		last := rows[len(rows)-1]
		data.Next = link(func(u url.Values) {
			u.Set("after", place{Sort: f.Sort, Desc: f.Desc, Value: last.Key.Value, ID: last.InstanceID, N: data.To}.String())
		})
	}
	cols := []column{{"Instance", store.SortInstance, "", ""}}
	if data.ShowProject {
		cols = append(cols, column{"Project", store.SortProject, "", ""})
	}
	cols = append(cols, []column{{"Phase", store.SortPhase, "", ""}, {"TPM", store.SortVersion, "", ""}, {"Host", store.SortHost, "", ""},
		{"Verdict", store.SortVerdict, "", ""}, {"Policy", store.SortPolicy, "", ""}, {"Last evidence", store.SortEvidence, "", ""}}...)
	for i, col := range cols {
		desc := false
		cols[i].Order = "none"
		if col.Sort == f.Sort {
			cols[i].Order, desc = "ascending", true // a second click reverses
			if f.Desc {
				cols[i].Order, desc = "descending", false
			}
		}
		cols[i].URL = link(func(u url.Values) {
			u.Set("sort", string(col.Sort))
			if desc {
				u.Set("dir", "desc")
			} else {
				u.Del("dir")
			}
		})
	}
	data.Columns = cols
	c.render(q, http.StatusOK, "instances.html", data)
	return nil
}

// keptParam is a query parameter a form carries along, hidden.
type keptParam struct{ Name, Value string }

// pcrRow is one PCR the policy judges, side by side with the boot.
type pcrRow struct {
	PCR       int
	Want, Got []byte
	// Digests is how many digests the policy allows (a digest policy).
	Digests int
	Status  string // matches, differs, not quoted, judged by digests
	Reason  string // the verdict's reason naming this PCR, if any
	Diff    *eventDiff
	// IMA is, for PCR 10 judged by a digest policy, the first IMA entry
	// the policy does not allow; IMAValue marks PCR 10 judged by its
	// value, which names no file.
	IMA      *imaView
	IMAValue bool
}

// imaView is an IMA entry a digest policy does not allow, and what the
// policy allows instead.
type imaView struct {
	Index     int
	Template  string
	Path      string
	Digest    string // algorithm:hex
	Violation bool
	// More counts the other entries the policy does not allow.
	More int
	// Allowed is how many file digests the policy allows on PCR 10, and
	// AllowedDigests lists them when they are few enough to read.
	Allowed        int
	AllowedDigests []string
}

// maxAllowedShown bounds the allowed digests an IMA mismatch lists (an
// allowlist may hold tens of thousands).
const maxAllowedShown = 4

// eventDiff is the first differing event of a PCR: the reference boot's
// and this boot's.
type eventDiff struct {
	Ref, Got *eventView
}

type eventView struct {
	Index       int
	Type        string
	Digest      string
	Description string
}

func viewEvent(e *attest.Event) *eventView {
	if e == nil {
		return nil
	}
	return &eventView{Index: e.Index, Type: e.TypeName(), Digest: hex.EncodeToString(e.Digest), Description: e.Description()}
}

// instance is one instance's page: its vTPM, its attestation PCR by PCR
// against its policy, its timeline.
func (c *Console) instance(q *request) error {
	ctx := q.ctx()
	vt, err := c.cfg.VTPMs.Get(ctx, q.viewer.caller(), q.r.PathValue("id"))
	if err != nil {
		return err
	}
	var events []store.Event
	err = c.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { events, err = tx.ListEvents(vt.InstanceID, vt.Incarnation); return err })
	if err != nil {
		return err
	}
	slices.Reverse(events)
	events = events[:min(len(events), maxTimeline)]
	data := &struct {
		base
		V            *store.VTPM
		Provisioning api.Provisioning
		Status       *verifier.Status
		// Policy is the named policy the record copied, if it still is
		// (not deleted, nor made again under its name since).
		Policy *store.Policy
		PCRs   []pcrRow
		Events []store.Event
		Now    time.Time
	}{base: base{Title: "Instance " + vt.InstanceID, Section: "instances", Viewer: q.viewer, SignedIn: true, Live: true},
		V: vt, Provisioning: c.cfg.Verifier.Provisioning(vt), Events: events, Now: c.cfg.Now()}
	sub, err := c.cfg.Verifier.Instance(ctx, q.viewer.caller(), vt.InstanceID)
	if err != nil {
		return err
	}
	// The record and its verdict in one read: the PCRs shown are the
	// ones the verdict judged.
	a, st, err := c.cfg.Verifier.Record(ctx, sub)
	var re *refusal.Error
	switch {
	case err == nil:
		data.Status, data.PCRs = &st, pcrRows(a, st.Reasons)
		if a.PolicyID != "" {
			err = c.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { data.Policy, err = tx.GetPolicyByID(a.PolicyID); return err })
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
		}
	case errors.As(err, &re) && re.Code == api.CodeNotRegistered:
	default:
		return err
	}
	c.render(q, http.StatusOK, "instance.html", data)
	return nil
}

// pcrRows compares, for each PCR a's policy judges, the policy's
// reference with what the last genuine evidence showed, and for a value
// that differs finds the first event that differs between the policy's
// reference log and the boot's.
func pcrRows(a *store.Attestation, reasons []string) []pcrRow {
	var which []int
	for i := range a.PolicyPCRs {
		which = append(which, i)
	}
	for i := range a.PolicyDigests {
		which = append(which, i)
	}
	slices.Sort(which)
	which = slices.Compact(which)
	var ref, cur []attest.Event
	if a.PolicyEventLog != nil && a.EventLog != nil {
		ref, _ = attest.ParseEventLog(a.PolicyEventLog)
		cur, _ = attest.ParseEventLog(a.EventLog)
	}
	var out []pcrRow
	for _, i := range which {
		row := pcrRow{PCR: i, Want: a.PolicyPCRs[i], Got: a.PCRs[i], Digests: len(a.PolicyDigests[i]), Status: "matches"}
		for _, r := range reasons {
			if strings.HasPrefix(r, fmt.Sprintf("PCR %d ", i)) || strings.HasPrefix(r, fmt.Sprintf("PCR %d:", i)) {
				row.Reason = r
			}
		}
		switch {
		case row.Got == nil:
			row.Status = "not quoted"
		case row.Want != nil && string(row.Want) != string(row.Got):
			row.Status = "differs"
			if d, ok := attest.FirstDifference(ref, cur, i); ok && ref != nil {
				row.Diff = &eventDiff{Ref: viewEvent(d.Ref), Got: viewEvent(d.Got)}
			}
		case row.Reason != "":
			row.Status = "differs"
		}
		if i == attest.IMAPCR && row.Status == "differs" {
			row.IMAValue = row.Want != nil && row.Diff == nil
			if row.Digests > 0 {
				row.IMA = firstDisallowedIMA(a)
			}
		}
		out = append(out, row)
	}
	return out
}

// firstDisallowedIMA judges a's last evidence again for the IMA entry of
// PCR 10 its digest policy does not allow (the record keeps the reason
// in words only); nil when there is none, or a's IMA log does not parse
// (it did when it was accepted).
func firstDisallowedIMA(a *store.Attestation) *imaView {
	if a.IMAEntries == 0 {
		return nil
	}
	ms, err := verifier.Mismatches(a)
	if err != nil {
		return nil
	}
	for _, m := range ms {
		if m.PCR != attest.IMAPCR || m.IMA == nil {
			continue
		}
		e := m.IMA
		v := &imaView{Index: e.Index, Template: e.Template, Path: e.Path, Digest: e.Algorithm + ":" + hex.EncodeToString(e.FileDigest),
			Violation: e.Violation, More: m.Disallowed - 1, Allowed: len(a.PolicyDigests[attest.IMAPCR])}
		if v.Allowed <= maxAllowedShown {
			for _, d := range a.PolicyDigests[attest.IMAPCR] {
				v.AllowedDigests = append(v.AllowedDigests, hex.EncodeToString(d))
			}
		}
		return v
	}
	return nil
}

// policyRow is a policy as the list shows it.
type policyRow struct {
	*store.Policy
	Shared bool
	Users  int
}

// policies lists the policies the viewer may apply: its project's and the
// operator's shared ones (every project's, for the operator), with how
// many of the viewer's instances copied each (by the policy's identity:
// one deleted and made again under its name is another).
func (c *Console) policies(q *request) error {
	var ps []*store.Policy
	var users []store.Count
	err := c.cfg.Store.View(q.ctx(), func(tx *store.Tx) (err error) {
		if q.viewer.Operator() {
			ps, err = tx.ListPolicies()
		} else {
			ps, err = tx.ListPolicies("", q.viewer.Project)
		}
		if err != nil {
			return err
		}
		users, err = tx.CountPolicyUsers(q.viewer.Project)
		return err
	})
	if err != nil {
		return err
	}
	n := map[string]int{}
	for _, u := range users {
		n[u.Value] = u.N
	}
	data := &struct {
		base
		Policies []policyRow
	}{base: base{Title: "Policies", Section: "policies", Viewer: q.viewer, SignedIn: true, Live: true}}
	for _, p := range ps {
		data.Policies = append(data.Policies, policyRow{Policy: p, Shared: p.Project == "", Users: n[p.ID]})
	}
	c.render(q, http.StatusOK, "policies.html", data)
	return nil
}

// maxPolicyUsers bounds the instances a policy's page lists.
const maxPolicyUsers = 100

// policy is one policy, by its identity: its reference, and the viewer's
// instances that copied it. A tenant sees its project's and the shared
// ones.
func (c *Console) policy(q *request) error {
	var p *store.Policy
	var users []string
	err := c.cfg.Store.View(q.ctx(), func(tx *store.Tx) (err error) {
		if p, err = tx.GetPolicyByID(q.r.PathValue("id")); err != nil {
			return err
		}
		if !q.viewer.Operator() && p.Project != "" && p.Project != q.viewer.Project {
			return errNoPage
		}
		users, err = tx.ListPolicyUsers(q.viewer.Project, p.ID, maxPolicyUsers)
		return err
	})
	if err != nil {
		return err
	}
	var pcrs []int
	for i := range p.PCRs {
		pcrs = append(pcrs, i)
	}
	for i := range p.Digests {
		pcrs = append(pcrs, i)
	}
	slices.Sort(pcrs)
	data := &struct {
		base
		P     *store.Policy
		PCRs  []int
		Users []string
		More  bool
	}{base: base{Title: "Policy " + p.Name, Section: "policies", Viewer: q.viewer, SignedIn: true, Live: true},
		P: p, PCRs: slices.Compact(pcrs), Users: users, More: len(users) == maxPolicyUsers}
	c.render(q, http.StatusOK, "policy.html", data)
	return nil
}
