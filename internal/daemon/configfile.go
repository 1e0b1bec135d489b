package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"reflect"
	"regexp"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/vtpmd/vtpmd/internal/spec"
)

// A Setting is one key of the configuration: a key of the file and the
// flag of the same name.
type Setting struct {
	// Key is the setting's name, in the file and as a flag.
	Key string
	// Field points at the setting's field in the Config it was listed
	// from: *string, *bool, *int, **int, *time.Duration, **time.Duration, *[]string,
	// *spec.Version, *[]spec.SecretSecurity or *slog.Level.
	Field any
	// Roles are the roles that take the setting (the field's roles tag).
	Roles []Role
}

// Settings lists c's settings in the order of Config's fields, each
// pointing into c; two configurations' lists line up index by index.
func (c *Config) Settings() []Setting {
	var out []Setting
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		for i := range v.NumField() {
			f := v.Type().Field(i)
			key, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if opts == "inline" {
				walk(v.Field(i))
				continue
			}
			out = append(out, Setting{Key: key, Field: v.Field(i).Addr().Interface(), Roles: parseRoles(f.Name, f.Tag.Get("roles"))})
		}
	}
	walk(reflect.ValueOf(c).Elem())
	return out
}

// A KeyError is a problem with one key of a configuration file.
type KeyError struct {
	Line    int    // the key's line in the file
	Key     string // the key as written
	Problem string
}

func (e *KeyError) Error() string { return fmt.Sprintf("line %d: %s: %s", e.Line, e.Key, e.Problem) }

// ParseConfig reads role r's configuration file: a YAML mapping whose
// keys are the role's settings' (its flag names, see Settings), durations
// written as "30s". Keys left out stay unset, for Defaults. Every unknown,
// repeated or ill-typed key, and every key of another role's, is
// reported, as a *KeyError, at once.
func ParseConfig(data []byte, r Role) (Config, error) {
	var c Config
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return c, err
	}
	if len(doc.Content) == 0 { // empty, or only comments
		return c, nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return c, fmt.Errorf("line %d: want key: value lines, as vtpmd config print writes", root.Line)
	}
	settings := map[string]Setting{}
	for _, s := range c.Settings() {
		settings[s.Key] = s
	}
	seen := map[string]int{}
	var errs []error
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		s, ok := settings[k.Value]
		field := s.Field
		switch {
		case !ok:
			errs = append(errs, &KeyError{k.Line, k.Value, fmt.Sprintf("unknown key (the keys are vtpmd %s's flag names)", r)})
		case !s.In(r):
			errs = append(errs, &KeyError{k.Line, k.Value, NotInRole(s.Roles, r)})
		case seen[k.Value] != 0:
			errs = append(errs, &KeyError{k.Line, k.Value, fmt.Sprintf("given again (first on line %d)", seen[k.Value])})
		default:
			seen[k.Value] = k.Line
			if err := v.Decode(field); err != nil {
				errs = append(errs, &KeyError{k.Line, k.Value, wants(field, v)})
			}
		}
	}
	return c, errors.Join(errs...)
}

// wants says what a field takes, when value v was not it.
func wants(field any, v *yaml.Node) string {
	var what string
	switch field.(type) {
	case *int, **int:
		what = "a whole number"
	case *bool:
		what = "true or false"
	case *time.Duration, **time.Duration:
		what = `a duration such as "30s"`
	case *[]string, *[]spec.SecretSecurity:
		what = "a list"
	case *slog.Level:
		what = "debug, info, warn or error"
	default:
		what = "a string"
	}
	if v.Kind == yaml.ScalarNode {
		return fmt.Sprintf("want %s, not %q", what, v.Value)
	}
	return "want " + what
}

// FormatConfig writes role r's settings of c as a configuration file
// that ParseConfig reads back, for r, to c's values of them.
func FormatConfig(c Config, r Role) []byte {
	doc := &yaml.Node{Kind: yaml.MappingNode}
	for _, s := range c.Settings() {
		if !s.In(r) {
			continue
		}
		var v yaml.Node
		if err := v.Encode(reflect.ValueOf(s.Field).Elem().Interface()); err != nil {
			panic(fmt.Sprintf("encoding setting %s: %v", s.Key, err)) // every field's type encodes
		}
		doc.Content = append(doc.Content, &yaml.Node{Kind: yaml.ScalarNode, Value: s.Key}, &v)
	}
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(doc); err != nil {
		panic(fmt.Sprintf("encoding a Config: %v", err))
	}
	enc.Close()
	return b.Bytes()
}

// Redacted stands for what Config.Redacted hid. Validate refuses a webhook
// URL with it, so that a printed configuration is not fed back by mistake.
const Redacted = "REDACTED"

// Redacted is c with whatever may be a secret replaced by Redacted: a
// password anywhere in Store (which Validate refuses anyway), the path,
// query and password of WebhookURL (webhook endpoints often carry their
// token there), and the password of PublicURL and HyperVHGS. User and host
// names stay.
func (c Config) Redacted() Config {
	c.Store = redactDSN(c.Store)
	c.WebhookURL = redactURL(c.WebhookURL, true)
	c.PublicURL = redactURL(c.PublicURL, false)
	c.HyperVHGS = redactURL(c.HyperVHGS, false)
	return c
}

// redactURL hides s's password and, with beyondHost, everything after the
// host. What does not parse as a URL is hidden whole.
func redactURL(s string, beyondHost bool) string {
	if s == "" {
		return s
	}
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return Redacted
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), Redacted)
	}
	if beyondHost && (strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.Fragment != "") {
		u.Path, u.RawPath, u.RawQuery, u.Fragment = "/"+Redacted, "", "", ""
	}
	return u.String()
}

// kvPassword is a password (password=, sslpassword=, …) in a key=value
// connection string, quoted or not.
var kvPassword = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)`)

// redactDSN hides every password in a PostgreSQL connection string, URL or
// key=value pairs.
func redactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return kvPassword.ReplaceAllString(dsn, "${1}"+Redacted)
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), Redacted)
	}
	q := u.Query()
	for k := range q {
		if strings.Contains(strings.ToLower(k), "password") {
			q.Set(k, Redacted)
			u.RawQuery = q.Encode()
		}
	}
	return u.String()
}
