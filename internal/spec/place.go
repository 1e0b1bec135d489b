package spec

import (
	"fmt"
	"strings"

	"github.com/vtpmd/vtpmd/api"
)

// HostState is whether a host takes new vTPMs.
type HostState string

// The host states. Only an up host takes new vTPMs; those a down or
// draining host holds stay where they are.
const (
	// HostUp: its agent's heartbeats arrive.
	HostUp HostState = "up"
	// HostDown: its agent has missed heartbeats for longer than the
	// server's window.
	HostDown HostState = "down"
	// HostDraining: the operator drained it.
	HostDraining HostState = "draining"
)

// Host is a placement candidate.
type Host struct {
	Name   string
	Traits TraitSet
	// Free is how many more vTPMs the host can take; at 0 or below it is full.
	Free  int
	State HostState
}

// Place chooses the host for a request that requires these traits: among the
// hosts that are up, have free capacity and offer every required trait, the
// one with the most free capacity; ties go to the smallest name, then to the
// earlier host in the list. When no host qualifies it returns an *Error with
// api.CodeNoValidHost that says what is missing.
func Place(hosts []Host, required []string) (Host, error) {
	best := -1
	for i := range hosts {
		h := &hosts[i]
		if h.State != HostUp || h.Free <= 0 || !h.Traits.HasAll(required) {
			continue
		}
		if best < 0 || h.Free > hosts[best].Free || h.Free == hosts[best].Free && h.Name < hosts[best].Name {
			best = i
		}
	}
	if best < 0 {
		return Host{}, noValidHost(hosts, required)
	}
	return hosts[best], nil
}

// noValidHost explains a failed placement. It runs only on failure, so it
// may take a second pass over the hosts.
func noValidHost(hosts []Host, required []string) error {
	if len(hosts) == 0 {
		return &Error{Code: api.CodeNoValidHost, Message: "No valid host: no hosts are registered."}
	}
	fitting := 0
	closed := map[string]int{} // why the fitting hosts take none: down, draining, full
	var last, lastWhy string
	for _, h := range hosts {
		if h.Traits.HasAll(required) {
			fitting++
			why := string(h.State)
			if h.State == HostUp {
				why = "full"
			}
			closed[why]++
			last, lastWhy = h.Name, why
		}
	}
	switch {
	case fitting == 1:
		return &Error{Code: api.CodeNoValidHost, Message: fmt.Sprintf(
			"No valid host: the one host that offers the required traits, %s, is %s.", show(last), lastWhy)}
	case fitting > 0 && closed["full"] == fitting:
		return &Error{Code: api.CodeNoValidHost, Message: fmt.Sprintf(
			"No valid host: all %d hosts that offer the required traits are full.", fitting)}
	case fitting > 0:
		var why []string
		for _, s := range []string{"down", "draining", "full"} {
			switch n := closed[s]; {
			case n == 1:
				why = append(why, "1 is "+s)
			case n > 1:
				why = append(why, fmt.Sprintf("%d are %s", n, s))
			}
		}
		return &Error{Code: api.CodeNoValidHost, Message: fmt.Sprintf(
			"No valid host: of the %d hosts that offer the required traits, %s.", fitting, list(why))}
	}

	// Traits no host offers at all are the clearest answer.
	var absent []string
	for _, t := range required {
		offered := false
		for _, h := range hosts {
			if offered = h.Traits.Has(t); offered {
				break
			}
		}
		if !offered {
			absent = append(absent, t)
		}
	}
	if len(absent) > 0 {
		return &Error{Code: api.CodeNoValidHost, Traits: absent, Message: fmt.Sprintf(
			"No valid host: no host offers %s.", strings.Join(absent, ", "))}
	}

	// Every trait exists somewhere, never together: name the closest host.
	var closest *Host
	var lacks []string
	for i := range hosts {
		m := hosts[i].Traits.Missing(required)
		if closest == nil || len(m) < len(lacks) || len(m) == len(lacks) && hosts[i].Name < closest.Name {
			closest, lacks = &hosts[i], m
		}
	}
	return &Error{Code: api.CodeNoValidHost, Traits: lacks, Message: fmt.Sprintf(
		"No valid host: no host offers %s together; the closest, %s, lacks %s.",
		strings.Join(required, ", "), show(closest.Name), strings.Join(lacks, ", "))}
}

// list joins items as a sentence does: "a", "a and b", "a, b and c".
func list(items []string) string {
	if len(items) < 2 {
		return strings.Join(items, "")
	}
	return strings.Join(items[:len(items)-1], ", ") + " and " + items[len(items)-1]
}
