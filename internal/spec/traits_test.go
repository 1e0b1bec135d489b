package spec

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
)

func TestRequiredTraits(t *testing.T) {
	tests := []struct {
		spec *Spec
		want []string
	}{
		{nil, []string{}},
		{&Spec{Version: V20, Model: TIS, SecretSecurity: User}, []string{TraitTPM20, TraitSecretSecurityUser, TraitTPMTIS}},
		{&Spec{Version: V12, Model: TIS, SecretSecurity: HostMode}, []string{TraitTPM12, TraitSecretSecurityHost, TraitTPMTIS}},
		{&Spec{Version: V20, Model: CRB, SecretSecurity: Deployment}, []string{TraitTPM20, TraitTPMCRB, TraitSecretSecurityDeployment}},
		{&Spec{Version: V20, Hypervisor: HyperV, Keys: []string{key1}}, []string{TraitTPM20, TraitHyperVGen2}},
	}
	for _, tc := range tests {
		if got := tc.spec.RequiredTraits(); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%+v.RequiredTraits() = %v; want %v", tc.spec, got, tc.want)
		}
	}
}

func TestHostTraits(t *testing.T) {
	allModes := []string{TraitSecretSecurityDeployment, TraitSecretSecurityHost, TraitSecretSecurityUser}
	tests := []struct {
		name string
		caps Capabilities
		want []string
	}{
		{"disabled offers nothing", Capabilities{Versions: []Version{V20}, Models: []Model{CRB}, HyperVGen2: true}, nil},
		{"no versions reported means both", Capabilities{Enabled: true, Models: []Model{TIS}},
			append([]string{TraitTPM12, TraitTPM20}, append(allModes, TraitTPMTIS)...)},
		{"reported versions and models only", Capabilities{Enabled: true, Versions: []Version{V20}, Models: []Model{CRB, TIS, "tpm-spapr"}},
			append([]string{TraitTPM20, TraitTPMCRB}, append(allModes, TraitTPMTIS)...)},
		{"operator limits modes", Capabilities{Enabled: true, Versions: []Version{"1.2", "9.9"}, SecretSecurity: []SecretSecurity{HostMode}},
			[]string{TraitTPM12, TraitSecretSecurityHost}},
		{"operator enables no mode", Capabilities{Enabled: true, Versions: []Version{V20}, SecretSecurity: []SecretSecurity{}},
			[]string{TraitTPM20}},
		{"hyper-v gen2", Capabilities{Enabled: true, Versions: []Version{V20}, SecretSecurity: []SecretSecurity{}, HyperVGen2: true},
			[]string{TraitTPM20, TraitHyperVGen2}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := HostTraits(tc.caps).List()
			if tc.want == nil {
				tc.want = []string{}
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("HostTraits = %v; want %v", got, tc.want)
			}
		})
	}
}

// TestHostServesWhatItOffers ties the two halves together: a host offers
// exactly the traits that the specs it can serve require.
func TestHostServesWhatItOffers(t *testing.T) {
	host := HostTraits(Capabilities{Enabled: true, Versions: []Version{V20}, Models: []Model{TIS, CRB}})
	serves := func(s *Spec) bool { return host.HasAll(s.RequiredTraits()) }
	for _, s := range []*Spec{
		{Version: V20, Model: TIS, SecretSecurity: User},
		{Version: V20, Model: CRB, SecretSecurity: Deployment},
	} {
		if !serves(s) {
			t.Errorf("host %v cannot serve %+v", host.List(), s)
		}
	}
	for _, s := range []*Spec{
		{Version: V12, Model: TIS, SecretSecurity: User},
		{Version: V20, Hypervisor: HyperV},
	} {
		if serves(s) {
			t.Errorf("host %v claims to serve %+v", host.List(), s)
		}
	}
}

func TestTraitSet(t *testing.T) {
	s := NewTraitSet("B", "A", "", "B", "C")
	if got := s.List(); !reflect.DeepEqual(got, []string{"A", "B", "C"}) {
		t.Fatalf("List = %v", got)
	}
	if !s.Has("A") || s.Has("D") || s.Has("") || !s.HasAll([]string{"C", "A"}) || s.HasAll([]string{"A", "D"}) {
		t.Fatal("membership wrong")
	}
	if got := s.Missing([]string{"D", "A", "E"}); !reflect.DeepEqual(got, []string{"D", "E"}) {
		t.Fatalf("Missing = %v", got)
	}
	b, err := json.Marshal(s)
	if err != nil || string(b) != `["A","B","C"]` {
		t.Fatalf("Marshal = %s, %v", b, err)
	}
	var back TraitSet
	if err := json.Unmarshal([]byte(`["Z","A","Z"]`), &back); err != nil || !reflect.DeepEqual(back.List(), []string{"A", "Z"}) {
		t.Fatalf("Unmarshal = %v, %v", back.List(), err)
	}
	if b, _ := json.Marshal(TraitSet{}); string(b) != "[]" {
		t.Fatalf("empty set marshals as %s", b)
	}
}

func TestPlace(t *testing.T) {
	tpm20 := NewTraitSet(TraitTPM20, TraitTPMTIS, TraitSecretSecurityUser)
	both := NewTraitSet(TraitTPM12, TraitTPM20, TraitTPMTIS, TraitTPMCRB, TraitSecretSecurityUser)
	req := []string{TraitTPM20, TraitTPMTIS, TraitSecretSecurityUser}

	tests := []struct {
		name    string
		hosts   []Host
		req     []string
		want    string
		missing []string // for no_valid_host
	}{
		{"most free wins", []Host{{"a", tpm20, 1, HostUp}, {"b", both, 5, HostUp}, {"c", tpm20, 3, HostUp}}, req, "b", nil},
		{"tie goes to smallest name", []Host{{"c", tpm20, 5, HostUp}, {"a", both, 5, HostUp}, {"b", tpm20, 5, HostUp}}, req, "a", nil},
		{"full hosts skipped", []Host{{"a", both, 0, HostUp}, {"b", tpm20, -1, HostUp}, {"c", tpm20, 1, HostUp}}, req, "c", nil},
		{"host lacking a trait skipped", []Host{{"a", tpm20, 9, HostUp}, {"b", both, 1, HostUp}}, []string{TraitTPMCRB}, "b", nil},
		{"no vTPM fits any host", []Host{{"a", TraitSet{}, 1, HostUp}, {"b", tpm20, 2, HostUp}}, []string{}, "b", nil},
		{"no hosts", nil, req, "", nil},
		{"all fitting hosts full", []Host{{"a", both, 0, HostUp}, {"b", tpm20, 0, HostUp}, {"c", TraitSet{}, 5, HostUp}}, req, "", nil},
		{"trait offered nowhere", []Host{{"a", tpm20, 1, HostUp}, {"b", both, 1, HostUp}}, []string{TraitTPM20, TraitHyperVGen2}, "", []string{TraitHyperVGen2}},
		{"down and draining hosts skipped", []Host{{"a", both, 9, HostDown}, {"b", both, 9, HostDraining}, {"c", tpm20, 1, HostUp}}, req, "c", nil},
		{"traits never together", []Host{{"b", NewTraitSet(TraitTPM12, TraitTPMCRB), 1, HostUp}, {"a", NewTraitSet(TraitTPM20), 1, HostUp}},
			[]string{TraitTPM20, TraitTPMCRB}, "", []string{TraitTPMCRB}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Place(tc.hosts, tc.req)
			if tc.want != "" {
				if err != nil || got.Name != tc.want {
					t.Fatalf("Place = %q, %v; want %q", got.Name, err, tc.want)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) || e.Code != api.CodeNoValidHost {
				t.Fatalf("Place = %q, %v; want no_valid_host", got.Name, err)
			}
			if !reflect.DeepEqual(e.Traits, tc.missing) {
				t.Fatalf("missing traits = %v; want %v (%s)", e.Traits, tc.missing, e.Message)
			}
			for _, m := range tc.missing {
				if !strings.Contains(e.Message, m) {
					t.Fatalf("message %q does not name %s", e.Message, m)
				}
			}
		})
	}
}

// TestNoValidHostSaysWhy: when every host that offers the traits takes
// no vTPM, the refusal says why each does not (down, draining, full), with
// no traits missing.
func TestNoValidHostSaysWhy(t *testing.T) {
	tpm20 := NewTraitSet(TraitTPM20)
	req := []string{TraitTPM20}
	for _, tc := range []struct {
		hosts []Host
		want  string
	}{
		{[]Host{{"h1", tpm20, 5, HostDraining}}, "No valid host: the one host that offers the required traits, h1, is draining."},
		{[]Host{{"h1", tpm20, 5, HostDown}, {"h2", TraitSet{}, 5, HostUp}}, "No valid host: the one host that offers the required traits, h1, is down."},
		{[]Host{{"a", tpm20, 0, HostDown}, {"b", tpm20, 5, HostDown}}, "No valid host: of the 2 hosts that offer the required traits, 2 are down."},
		{[]Host{{"a", tpm20, 5, HostDown}, {"b", tpm20, 5, HostDraining}, {"c", tpm20, 0, HostUp}},
			"No valid host: of the 3 hosts that offer the required traits, 1 is down, 1 is draining and 1 is full."},
		{[]Host{{"a", tpm20, 0, HostUp}, {"b", tpm20, 0, HostUp}}, "No valid host: all 2 hosts that offer the required traits are full."},
	} {
		_, err := Place(tc.hosts, req)
		var e *Error
		if !errors.As(err, &e) || e.Code != api.CodeNoValidHost || e.Message != tc.want || e.Traits != nil {
			t.Errorf("Place(%v) = %v; want no_valid_host %q and no traits", tc.hosts, err, tc.want)
		}
	}
}

// TestPlaceMatchesBruteForce checks Place against a direct reading of its
// contract on generated fleets.
func TestPlaceMatchesBruteForce(t *testing.T) {
	all := []string{TraitTPM12, TraitTPM20, TraitTPMTIS, TraitTPMCRB, TraitSecretSecurityUser, TraitSecretSecurityHost}
	for seed := range 200 {
		hosts := fleet(seed, 30, all)
		req := []string{all[seed%2], all[2+seed%2], all[4+seed/2%2]}
		got, err := Place(hosts, req)

		var want *Host
		for i := range hosts {
			h := &hosts[i]
			ok := h.Free > 0 && h.State == HostUp
			for _, r := range req {
				ok = ok && h.Traits.Has(r)
			}
			if ok && (want == nil || h.Free > want.Free || h.Free == want.Free && h.Name < want.Name) {
				want = h
			}
		}
		if want == nil {
			if err == nil {
				t.Fatalf("seed %d: Place chose %s; brute force found no host", seed, got.Name)
			}
			continue
		}
		if err != nil || got.Name != want.Name {
			t.Fatalf("seed %d: Place = %s, %v; want %s", seed, got.Name, err, want.Name)
		}
	}
}

// fleet makes n hosts with pseudo-random traits and capacity from a seed.
func fleet(seed, n int, traits []string) []Host {
	x := uint32(seed*2654435761 + 1)
	next := func() uint32 { x ^= x << 13; x ^= x >> 17; x ^= x << 5; return x }
	hosts := make([]Host, n)
	for i := range hosts {
		var ts []string
		for _, tr := range traits {
			if next()%3 != 0 {
				ts = append(ts, tr)
			}
		}
		states := []HostState{HostUp, HostUp, HostUp, HostDown, HostDraining}
		hosts[i] = Host{Name: fmt.Sprintf("host-%05d", next()%100000), Traits: NewTraitSet(ts...), Free: int(next()%8) - 1,
			State: states[next()%uint32(len(states))]}
	}
	return hosts
}
