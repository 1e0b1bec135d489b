package daemon

import (
	"fmt"
	"slices"
	"strings"
)

// A Role is one way vtpmd runs: each setting belongs to the roles that
// use it, and a role refuses the others' (as a flag and as a file's key).
type Role string

// vtpmd's roles.
const (
	// RoleServer is the control plane: the API, the store, the key
	// manager, the CAs and the verifier.
	RoleServer Role = "server"
	// RoleAgent is a hypervisor host's agent, reporting to a server.
	RoleAgent Role = "agent"
	// RoleAllInOne is a server and this host's agent in one process.
	RoleAllInOne Role = "all-in-one"
)

// Roles lists every role, in the order vtpmd's help names them.
var Roles = []Role{RoleServer, RoleAgent, RoleAllInOne}

// ParseRole reads a role's name.
func ParseRole(s string) (Role, error) {
	if r := Role(s); slices.Contains(Roles, r) {
		return r, nil
	}
	return "", fmt.Errorf("role %q must be server, agent or all-in-one", s)
}

// parseRoles reads a field's roles tag: comma-separated role names.
func parseRoles(field, tag string) []Role {
	if tag == "" {
		panic("vtpmd: config field " + field + " has no roles tag")
	}
	var rs []Role
	for _, s := range strings.Split(tag, ",") {
		r, err := ParseRole(s)
		if err != nil {
			panic("vtpmd: config field " + field + ": " + err.Error())
		}
		rs = append(rs, r)
	}
	return rs
}

// In reports whether s is a setting of role r.
func (s Setting) In(r Role) bool { return slices.Contains(s.Roles, r) }

// RolesOf returns the roles whose setting key is, or nil if no setting is
// named key.
func RolesOf(key string) []Role {
	var c Config
	for _, s := range c.Settings() {
		if s.Key == key {
			return s.Roles
		}
	}
	return nil
}

// NotInRole says that a setting is another role's: "a setting of vtpmd
// agent and vtpmd all-in-one, not of vtpmd server".
func NotInRole(roles []Role, r Role) string {
	names := make([]string, len(roles))
	for i, o := range roles {
		names[i] = "vtpmd " + string(o)
	}
	list := strings.Join(names, " and ")
	if len(names) > 2 {
		list = strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1]
	}
	return fmt.Sprintf("a setting of %s, not of vtpmd %s", list, r)
}
