package console

import (
	"encoding/hex"
	"errors"
	"fmt"
	"html/template"
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

// instanceRow is an instance as the table shows it.
type instanceRow struct {
	store.Instance
	Evidence string
}

// instances is the table of the viewer's instances: filtered, sorted and
// paged in the store.
func (c *Console) instances(q *request) error {
	v := q.r.URL.Query()
	f := store.InstanceQuery{Project: q.viewer.Project, Host: v.Get("host"), Phase: store.Phase(v.Get("phase")),
		Verdict: store.Verdict(v.Get("verdict")), Policy: v.Get("policy"), Search: strings.TrimSpace(v.Get("q")),
		Sort: store.InstanceSort(v.Get("sort")), Desc: v.Get("dir") == "desc", Limit: PageSize}
	if q.viewer.Operator() {
		f.Project = v.Get("project")
	}
	if !store.ValidSort(f.Sort) {
		f.Sort = store.SortInstance
	}
	page, _ := strconv.Atoi(v.Get("page"))
	page = max(page, 1)
	f.Offset = (page - 1) * PageSize
	var rows []store.Instance
	var total int
	err := c.cfg.Store.View(q.ctx(), func(tx *store.Tx) (err error) { rows, total, err = tx.ListInstances(f); return err })
	if err != nil {
		return err
	}
	now := c.cfg.Now()
	data := &struct {
		base
		F                 store.InstanceQuery
		Columns           []column
		Rows              []instanceRow
		Total, From, To   int
		Prev, Next        string
		Phases, Verdicts  []string
		ShowProject, Page bool
	}{base: base{Title: "Instances", Section: "instances", Viewer: q.viewer, SignedIn: true, Live: true},
		F: f, Total: total, ShowProject: q.viewer.Operator(),
		Phases:   []string{"pending", "provisioning", "active", "stopped", "shelving", "shelved", "unshelving", "deleting", "error"},
		Verdicts: []string{"trusted", "untrusted", "stale", "pending", "none"}}
	for _, r := range rows {
		data.Rows = append(data.Rows, instanceRow{Instance: r, Evidence: ago(now, r.EvidenceAt)})
	}
	if len(rows) > 0 {
		data.From, data.To = f.Offset+1, f.Offset+len(rows)
	}
	link := func(change func(url.Values)) string {
		u := url.Values{}
		for k, vs := range v {
			u[k] = slices.Clone(vs)
		}
		change(u)
		return "/ui/instances?" + u.Encode()
	}
	if page > 1 {
		data.Prev = link(func(u url.Values) { u.Set("page", strconv.Itoa(page-1)) })
	}
	if f.Offset+len(rows) < total {
		data.Next = link(func(u url.Values) { u.Set("page", strconv.Itoa(page+1)) })
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
			u.Del("page")
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

// pcrRow is one PCR the policy judges, side by side with the boot.
type pcrRow struct {
	PCR       int
	Want, Got []byte
	// Digests is how many digests the policy allows (a digest policy).
	Digests int
	Status  string // matches, differs, not quoted, judged by digests
	Reason  string // the verdict's reason naming this PCR, if any
	Diff    *eventDiff
}

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
		PCRs         []pcrRow
		Events       []store.Event
		Now          time.Time
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
		out = append(out, row)
	}
	return out
}

// policyRow is a policy as the list shows it.
type policyRow struct {
	*store.Policy
	Shared bool
	Users  int
}

// policies lists the policies the viewer may apply: its project's and the
// operator's shared ones (every project's, for the operator), with how
// many of the viewer's instances use each.
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
		data.Policies = append(data.Policies, policyRow{Policy: p, Shared: p.Project == "", Users: n[p.Name]})
	}
	c.render(q, http.StatusOK, "policies.html", data)
	return nil
}

// maxPolicyUsers bounds the instances a policy's page lists.
const maxPolicyUsers = 100

// policy is one policy: its reference, and the viewer's instances that
// use it. ?project= names the project whose policy it is (a tenant's own
// by default); a name the project has no policy of is the shared one's.
func (c *Console) policy(q *request) error {
	name := q.r.PathValue("name")
	project := q.r.URL.Query().Get("project")
	if project == "" {
		project = q.viewer.Project
	}
	if !q.viewer.Operator() && project != q.viewer.Project {
		return errNoPage
	}
	var p *store.Policy
	var users []string
	err := c.cfg.Store.View(q.ctx(), func(tx *store.Tx) (err error) {
		// The project's own policy of that name, else the shared one, as
		// applying a policy by name finds it.
		p, err = tx.GetPolicy(project, name)
		if errors.Is(err, store.ErrNotFound) && project != "" {
			p, err = tx.GetPolicy("", name)
		}
		if err != nil {
			return err
		}
		users, err = tx.ListPolicyUsers(q.viewer.Project, name, maxPolicyUsers)
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
		P       *store.Policy
		PCRs    []int
		Users   []string
		More    bool
		Project string
	}{base: base{Title: "Policy " + name, Section: "policies", Viewer: q.viewer, SignedIn: true, Live: true},
		P: p, PCRs: slices.Compact(pcrs), Users: users, More: len(users) == maxPolicyUsers, Project: project}
	c.render(q, http.StatusOK, "policy.html", data)
	return nil
}
