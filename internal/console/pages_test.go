package console

import (
	"context"
	"fmt"
	"html"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/internal/store"
)

var (
	rowID    = regexp.MustCompile(`<th scope="row"><a href="/ui/instances/([^"]+)">`)
	pageLink = regexp.MustCompile(`<a href="([^"]+)"(?: rel="(prev|next)")?>(⇤ First|← Previous|Next →)</a>`)
	summary  = regexp.MustCompile(`Instances (\d+)–(\d+) of (\d+)`)
)

// page is an Instances page as a browser reads it: its rows' ids, its
// numbering, its links to the first, previous and next pages.
type page struct {
	ids               []string
	from, to, total   int
	first, prev, next string
}

func readPage(t *testing.T, c *Console, path string, cookie *http.Cookie) page {
	t.Helper()
	w := get(c, path, cookie)
	if w.Code != 200 {
		t.Fatalf("%s: %d\n%s", path, w.Code, w.Body)
	}
	body := w.Body.String()
	var p page
	for _, m := range rowID.FindAllStringSubmatch(body, -1) {
		p.ids = append(p.ids, m[1])
	}
	if m := summary.FindStringSubmatch(body); m != nil {
		fmt.Sscan(m[1], &p.from)
		fmt.Sscan(m[2], &p.to)
		fmt.Sscan(m[3], &p.total)
	}
	for _, m := range pageLink.FindAllStringSubmatch(body, -1) {
		u := html.UnescapeString(m[1])
		switch m[3] {
		case "⇤ First":
			p.first = u
		case "← Previous":
			p.prev = u
		default:
			p.next = u
		}
	}
	return p
}

// The Instances table pages by place: following Next from the first page
// meets every instance once, in order, numbered; following Previous back
// from the last meets the same pages; First goes back to the start; the
// filter and the order stay; a damaged link is refused.
func TestInstancesPages(t *testing.T) {
	c, st, _ := testConsole(t)
	const n = 2*PageSize + 7
	fill(t, st, n)
	session := signIn(t, c, Viewer{Name: "ops"})
	for _, start := range []string{"/ui/instances", "/ui/instances?sort=verdict&dir=desc", "/ui/instances?sort=host", "/ui/instances?verdict=trusted&sort=evidence"} {
		var pages []page
		for path := start; path != ""; {
			p := readPage(t, c, path, session)
			pages = append(pages, p)
			path = p.next
		}
		var all []string
		for i, p := range pages {
			if p.from != len(all)+1 || p.to != len(all)+len(p.ids) || p.total != pages[0].total || (p.prev != "") != (i > 0) || (p.first != "") != (i > 0) {
				t.Fatalf("%s, page %d: %+v", start, i+1, p)
			}
			all = append(all, p.ids...)
		}
		if len(all) != pages[0].total || len(slices.Compact(slices.Sorted(slices.Values(all)))) != len(all) {
			t.Fatalf("%s: %d rows of %d, or some twice: %v", start, len(all), pages[0].total, all)
		}
		if start == "/ui/instances" && (len(pages) != 3 || all[0] != "00000000-0000-4000-8000-000000000000" || !slices.IsSorted(all)) {
			t.Fatalf("by id: %d pages, %v", len(pages), all)
		}
		for i := len(pages) - 1; i > 0; i-- {
			if back := readPage(t, c, pages[i].prev, session); !slices.Equal(back.ids, pages[i-1].ids) || back.from != pages[i-1].from {
				t.Fatalf("%s, the page before page %d: %+v, want %+v", start, i+1, back, pages[i-1])
			}
		}
		if first := readPage(t, c, pages[len(pages)-1].first, session); !slices.Equal(first.ids, pages[0].ids) || first.prev != "" {
			t.Fatalf("%s, the first page from the last: %+v", start, first)
		}
	}
	// A place past every row (they went meanwhile): the first page.
	past := place{Sort: store.SortInstance, Value: "z", ID: "z", N: n}
	if p := readPage(t, c, "/ui/instances?after="+past.String(), session); p.from != 1 || len(p.ids) != PageSize || p.prev != "" {
		t.Fatalf("after every row: %+v", p)
	}
	// A place is the order's it was made in.
	p := readPage(t, c, "/ui/instances", session)
	for _, bad := range []string{"/ui/instances?after=garbage", strings.Replace(p.next, "/ui/instances?", "/ui/instances?sort=host&", 1)} {
		if w := get(c, bad, session); w.Code != http.StatusBadRequest {
			t.Fatalf("%s: %d", bad, w.Code)
		}
	}
}

// The Policies pages count and list an instance under the very policy
// it copied: a project's policy and a shared one of the same name are
// two, and a policy deleted and made again under its name is a new one
// that no instance copied yet. A tenant sees its project's and the
// shared ones, not another project's.
func TestPolicyUsersByIdentity(t *testing.T) {
	c, st, _ := testConsole(t)
	ctx := context.Background()
	shared, own := &store.Policy{Name: "gold", PCRs: map[int][]byte{0: {1}}}, &store.Policy{Project: "p1", Name: "gold", PCRs: map[int][]byte{0: {2}}}
	theirs := &store.Policy{Project: "p2", Name: "blue", PCRs: map[int][]byte{0: {3}}}
	err := st.Update(ctx, func(tx *store.Tx) error {
		for _, p := range []*store.Policy{shared, own, theirs} {
			if err := tx.CreatePolicy(p); err != nil {
				return err
			}
		}
		if err := tx.PutHost(&store.Host{Name: "h1", Capacity: 10, Backend: "swtpm"}); err != nil {
			return err
		}
		for i, copied := range []*store.Policy{shared, shared, own} { // p1's: i-0 and i-1 the shared gold, i-2 its own
			id := fmt.Sprintf("i-%d", i)
			if err := tx.CreateVTPM(&store.VTPM{InstanceID: id, Project: "p1", Host: "h1", Desired: store.DesiredRunning, Phase: store.PhaseActive}); err != nil {
				return err
			}
			if err := tx.PutAttestation(&store.Attestation{InstanceID: id, Verdict: store.VerdictTrusted, PolicyName: copied.Name, PolicyID: copied.ID}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	p1 := signIn(t, c, Viewer{Name: "a", Project: "p1"})
	usedBy := func(body, id string) string {
		t.Helper()
		m := regexp.MustCompile(`<a href="/ui/instances\?policy_id=` + id + `">(\d+) instances?</a>`).FindStringSubmatch(body)
		if m == nil {
			return ""
		}
		return m[1]
	}
	list := get(c, "/ui/policies", p1).Body.String()
	if usedBy(list, shared.ID) != "2" || usedBy(list, own.ID) != "1" || strings.Contains(list, theirs.ID) {
		t.Fatalf("p1's policies:\n%s", list)
	}
	one := get(c, "/ui/policies/"+shared.ID, p1).Body.String()
	if !strings.Contains(one, `href="/ui/instances/i-0"`) || !strings.Contains(one, `href="/ui/instances/i-1"`) || strings.Contains(one, `href="/ui/instances/i-2"`) {
		t.Fatalf("the shared gold's page:\n%s", one)
	}
	if got := readPage(t, c, "/ui/instances?policy_id="+own.ID, p1); !slices.Equal(got.ids, []string{"i-2"}) {
		t.Fatalf("p1's gold's instances: %+v", got)
	}
	if w := get(c, "/ui/policies/"+theirs.ID, p1); w.Code != http.StatusNotFound {
		t.Fatalf("p2's policy for p1: %d", w.Code)
	}

	// The shared gold made again: another policy, used by none.
	again := &store.Policy{Name: "gold", PCRs: map[int][]byte{0: {1}}}
	err = st.Update(ctx, func(tx *store.Tx) error {
		if err := tx.DeletePolicy("", "gold"); err != nil {
			return err
		}
		return tx.CreatePolicy(again)
	})
	if err != nil {
		t.Fatal(err)
	}
	list = get(c, "/ui/policies", p1).Body.String()
	if usedBy(list, again.ID) != "0" || usedBy(list, own.ID) != "1" {
		t.Fatalf("p1's policies after gold was made again:\n%s", list)
	}
	if w := get(c, "/ui/policies/"+shared.ID, p1); w.Code != http.StatusNotFound {
		t.Fatalf("the deleted gold's page: %d", w.Code)
	}
}
