package spec

import (
	"fmt"
	"strings"

	"github.com/vtpmd/vtpmd/api"
)

// Host is a placement candidate.
type Host struct {
	Name   string
	Traits TraitSet
	// Free is how many more vTPMs the host can take; at 0 or below it is full.
	Free int
}

// Place chooses the host for a request that requires these traits: among the
// hosts with free capacity that offer every required trait, the one with the
// most free capacity; ties go to the smallest name, then to the earlier host
// in the list. When no host qualifies it returns an *Error with
// api.CodeNoValidHost that says what is missing.
func Place(hosts []Host, required []string) (Host, error) {
	best := -1
	for i := range hosts {
		h := &hosts[i]
		if h.Free <= 0 || !h.Traits.HasAll(required) {
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
	for _, h := range hosts {
		if h.Traits.HasAll(required) {
			fitting++
		}
	}
	if fitting > 0 {
		return &Error{Code: api.CodeNoValidHost, Message: fmt.Sprintf(
			"No valid host: all %d hosts that offer the required traits are full.", fitting)}
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
