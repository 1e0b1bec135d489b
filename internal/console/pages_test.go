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

// ?page=N shows page N of the order and filter the other parameters say,
// the same rows and numbering as N-1 Nexts from the first page, its links
// going on from there; a page past the last is the last; a page that is
// not a number from 1 is refused with a message saying so.
func TestInstancesPageNumber(t *testing.T) {
	c, st, _ := testConsole(t)
	const n = 2*PageSize + 7
	fill(t, st, n)
	session := signIn(t, c, Viewer{Name: "ops"})
	for _, start := range []string{"/ui/instances?", "/ui/instances?sort=verdict&dir=desc&", "/ui/instances?sort=host&", "/ui/instances?verdict=trusted&sort=evidence&"} {
		var pages []page
		for path := start; path != ""; {
			p := readPage(t, c, path, session)
			pages = append(pages, p)
			path = p.next
		}
		for i, want := range pages {
			got := readPage(t, c, fmt.Sprintf("%spage=%d", start, i+1), session)
			if !slices.Equal(got.ids, want.ids) || got.from != want.from || got.total != want.total || (got.prev != "") != (i > 0) || (got.next != "") != (i < len(pages)-1) {
				t.Fatalf("%spage=%d: %+v, want %+v", start, i+1, got, want)
			}
			if i > 0 {
				if back := readPage(t, c, got.prev, session); !slices.Equal(back.ids, pages[i-1].ids) || strings.Contains(got.prev, "page=") {
					t.Fatalf("%spage=%d, Previous (%s): %+v", start, i+1, got.prev, back)
				}
			}
			if i < len(pages)-1 {
				if next := readPage(t, c, got.next, session); !slices.Equal(next.ids, pages[i+1].ids) {
					t.Fatalf("%spage=%d, Next: %+v", start, i+1, next)
				}
			}
		}
		last := pages[len(pages)-1]
		if past := readPage(t, c, start+"page=9999", session); !slices.Equal(past.ids, last.ids) || past.from != last.from || past.next != "" {
			t.Fatalf("%spage=9999: %+v, want the last page %+v", start, past, last)
		}
	}
	// The page wins over a place given with it; the form to go to a page
	// says where the table is and carries the filter along.
	p := readPage(t, c, "/ui/instances", session)
	if got := readPage(t, c, p.next+"&page=3", session); got.from != 2*PageSize+1 {
		t.Fatalf("page=3 with a place: %+v", got)
	}
	body := get(c, "/ui/instances?verdict=trusted&page=2", session).Body.String()
	for _, want := range []string{`name="page" type="number" min="1" max="2" value="2"`, `<input type="hidden" name="verdict" value="trusted">`} {
		if !strings.Contains(body, want) {
			t.Fatalf("page 2 of the trusted has no %s:\n%s", want, body)
		}
	}
	if strings.Contains(get(c, "/ui/instances?q=00000000-0000-4000-8000-00000000001", session).Body.String(), `name="page"`) {
		t.Fatal("a table of one page offers to go to a page")
	}
	for _, bad := range []string{"0", "-1", "seven", "1.5", "99999999999999999999"} {
		w := get(c, "/ui/instances?page="+bad, session)
		if w.Code != http.StatusBadRequest || !strings.Contains(html.UnescapeString(w.Body.String()), fmt.Sprintf("%q is not a page number: pages are numbered from 1.", bad)) {
			t.Fatalf("page=%s: %d\n%s", bad, w.Code, w.Body)
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
