// Package xen provisions vTPMs the way the original Xen design does: the
// VTPM manager (vtpmmgr, a stub domain that owns the physical TPM) keeps
// each vTPM's keys under a group, and every vTPM is its own stub domain
// (vtpm-stubdom) with a 2 MiB disk for its NVRAM, attached to its guest by
// name. No Xen host exists where vtpmd is tested, so the VTPM manager is an
// in-process implementation of the same books (Group), and the domains are
// configuration files (xl and libvirt) written and removed, not started.
package xen

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"sync"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// Manager is a VTPM manager group: the vTPM UUIDs vtpmmgr will serve keys
// for. On a Xen host it is vtpmmgr's group; here, Group.
type Manager interface {
	// Register allocates a fresh vTPM UUID and registers it with the group
	// for owner: a stub domain vtpmd provisions, or the UUID service's
	// caller.
	Register(ctx context.Context, owner string) (uuid.UUID, error)
	// Release removes id from the group; releasing an unknown id is a no-op.
	Release(ctx context.Context, id uuid.UUID) error
	// Registered lists the group's registrations, oldest first.
	Registered(ctx context.Context) ([]Registration, error)
}

// Registration is one vTPM UUID of a group and who asked for it.
type Registration struct {
	UUID  uuid.UUID `json:"uuid"`
	Owner string    `json:"owner"`
}

// ErrGroupFull is returned by Register when the group holds as many vTPMs
// as the TPM's NVRAM allows.
var ErrGroupFull = errors.New("the VTPM manager group is full (its TPM's NVRAM is used up)")

// DefaultCapacity is how many vTPMs a group takes unless configured.
const DefaultCapacity = 64

var groupName = regexp.MustCompile(`^Group([0-9]+)$`)

// Group is an in-process VTPM manager group, kept in one file.
type Group struct {
	name     string
	capacity int
	path     string

	mu   sync.Mutex
	regs []Registration
}

// OpenGroup opens (or creates) group name's books in dir. Group0 is
// vtpmmgr's own and special: vTPMs go to Group1 or higher.
func OpenGroup(dir, name string, capacity int) (*Group, error) {
	m := groupName.FindStringSubmatch(name)
	if m == nil {
		return nil, fmt.Errorf("VTPM manager group %q: want Group1, Group2, …", name)
	}
	if n, _ := strconv.Atoi(m[1]); n == 0 {
		return nil, errors.New("VTPM manager group Group0 is special (vtpmmgr's own); register vTPMs to Group1 or higher")
	}
	if capacity <= 0 {
		capacity = DefaultCapacity
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	g := &Group{name: name, capacity: capacity, path: filepath.Join(dir, "vtpmmgr-"+name+".json")}
	data, err := os.ReadFile(g.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return g, nil
	case err != nil:
		return nil, err
	}
	var books groupFile
	if err := json.Unmarshal(data, &books); err != nil || books.Group != name {
		return nil, fmt.Errorf("%s is not %s's books: %v", g.path, name, err)
	}
	g.regs = books.Registrations
	return g, nil
}

type groupFile struct {
	Group         string         `json:"group"`
	Registrations []Registration `json:"registrations"`
}

// Name is the group's name.
func (g *Group) Name() string { return g.name }

func (g *Group) Register(ctx context.Context, owner string) (uuid.UUID, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.regs) >= g.capacity {
		return uuid.Nil, fmt.Errorf("%w: %s holds %d", ErrGroupFull, g.name, len(g.regs))
	}
	id := uuid.New()
	if err := g.save(append(slices.Clip(g.regs), Registration{UUID: id, Owner: owner})); err != nil {
		return uuid.Nil, err
	}
	return id, nil
}

func (g *Group) Release(ctx context.Context, id uuid.UUID) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	i := slices.IndexFunc(g.regs, func(r Registration) bool { return r.UUID == id })
	if i < 0 {
		return nil
	}
	return g.save(slices.Delete(slices.Clone(g.regs), i, i+1))
}

func (g *Group) Registered(ctx context.Context) ([]Registration, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.regs), nil
}

// save writes regs as the group's books, then adopts them.
func (g *Group) save(regs []Registration) error {
	data, err := json.MarshalIndent(groupFile{Group: g.name, Registrations: regs}, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(g.path, data, 0o600); err != nil {
		return err
	}
	g.regs = regs
	return nil
}
