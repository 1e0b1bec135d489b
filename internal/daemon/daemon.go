package daemon

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/client"
	"github.com/vtpmd/vtpmd/internal/agent"
	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/backend/direct"
	"github.com/vtpmd/vtpmd/internal/backend/libvirt"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/enrol"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/server"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/swtpm"
	"github.com/vtpmd/vtpmd/internal/swtpm/swtpmhost"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
	"github.com/vtpmd/vtpmd/internal/webhook"
)

// AllInOne is a running server plus local agent.
type AllInOne struct {
	Addr string // the address the API listens on
	URL  string // the API's URL: http:// or, with TLS, https:// Addr
	// OperatorURL is the operator's local API: unix:// and the socket's path.
	OperatorURL string
	// XenUUIDAddr is where the Xen UUID service listens; "" if not served.
	XenUUIDAddr string
	cfg         Config
	store       *store.Store
	swtpm       *swtpmhost.Runtime // runs swtpm, for the swtpm backend or under libvirt's
	host        hostBackend        // what the agent drives
	records     *agentstore.Records
	agent       *agent.Agent
	http        *http.Server
	ln          net.Listener
	local       *http.Server // the operator's socket
	log         *slog.Logger
	hostTPM     *hostAttester // nil when the host attests no TPM
	xenUUID     *http.Server  // the Xen UUID service, when served
	// stopBackground ends work that outlives requests (webhook deliveries,
	// host attestation).
	stopBackground context.CancelFunc
}

// StartAllInOne opens (creating on first start) everything under
// cfg.DataDir, starts the API and the agent, and returns once the API
// listens. Stop it with Shutdown.
func StartAllInOne(ctx context.Context, cfg Config, log *slog.Logger) (*AllInOne, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Private even when it existed before (a mkdir -p with the default
	// umask makes 0755): it holds the operator's socket and the keys.
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("making the data dir private: %w", err)
	}
	st, err := openStore(ctx, cfg)
	if err != nil {
		return nil, err
	}
	d := &AllInOne{cfg: cfg, store: st, log: log}
	if err := d.start(ctx); err != nil {
		st.Close()
		return nil, err
	}
	return d, nil
}

func (d *AllInOne) start(ctx context.Context) error {
	cfg := d.cfg
	// TLS first: a bad certificate must stop the start before any vTPM
	// runs. With TLS, self is how this process's own clients (the host
	// agent) trust the API.
	var serving, self *tls.Config
	if cfg.TLSCert != "" {
		var err error
		if serving, self, err = tlsConfigs(cfg.TLSCert, cfg.TLSKey); err != nil {
			return fmt.Errorf("TLS certificate and key: %w", err)
		}
	}
	clientCAs := x509.NewCertPool()
	if cfg.ClientCA != "" {
		var err error
		if clientCAs, err = client.LoadCAs(cfg.ClientCA); err != nil {
			return fmt.Errorf("client CAs: %w", err)
		}
	}
	kr, err := keyring.OpenEmbedded(filepath.Join(cfg.DataDir, "keys"))
	if err != nil {
		return fmt.Errorf("opening key manager: %w", err)
	}
	authority, err := ca.Open(ctx, filepath.Join(cfg.DataDir, "ca"), kr, ca.Options{Organization: cfg.CAOrganization})
	if err != nil {
		return fmt.Errorf("opening CA: %w", err)
	}
	hostCA, err := ca.Open(ctx, filepath.Join(cfg.DataDir, "host-ca"), kr, ca.Options{CommonName: ca.HostCommonName, Organization: cfg.CAOrganization})
	if err != nil {
		return fmt.Errorf("opening host CA: %w", err)
	}
	if serving != nil {
		// Hosts' agents (host CA), tenants and the operator (--client-ca)
		// may each present a certificate; it is checked if given, and the
		// routes say whose they require (internal/server, auth.go). Guest
		// agents have none: they prove themselves per request (tokens).
		clientCAs.AddCert(hostCA.Certificate())
		serving.ClientCAs, serving.ClientAuth = clientCAs, tls.VerifyClientCertIfGiven
	}
	if cfg.libvirtExternal() && cfg.SocketGroup == "" {
		// QEMU connects to vtpmd's swtpm as whatever libvirt runs it as.
		if cfg.SocketGroup, err = libvirt.QEMUGroup(cfg.Libvirt.Socket); err != nil {
			return fmt.Errorf("libvirt backend: %w", err)
		}
	}
	d.swtpm, err = swtpmhost.New(swtpmhost.Config{
		Root: filepath.Join(cfg.DataDir, "vtpms"), SocketDir: cfg.SocketDir, SocketGroup: cfg.SocketGroup,
		User: cfg.SwtpmUser, Group: cfg.SwtpmGroup,
		Binary: cfg.SwtpmBinary, PCRBanks: cfg.PCRBanks, Certifier: certifier{authority}, Log: d.log, PoolSize: poolSize(cfg),
		// Guests hold their vTPM's swtpm in external mode: it outlives a
		// restart of vtpmd, which takes it back (QEMU never reconnects).
		KeepRunning: cfg.libvirtExternal(),
	})
	if err != nil {
		return err
	}
	if !cfg.libvirtExternal() {
		if err := d.sweep(); err != nil {
			return err
		}
	}
	if err := reclaimSecrets(ctx, d.store, d.swtpm, kr, d.log); err != nil {
		return fmt.Errorf("reclaiming orphan secrets: %w", err)
	}
	d.host = direct.New(d.swtpm)
	if cfg.Backend == "libvirt" {
		d.host, err = libvirt.New(ctx, libvirt.Config{
			Mode: libvirt.Mode(cfg.Libvirt.Mode), EnableVTPM: cfg.Libvirt.EnableVTPM, Socket: cfg.Libvirt.Socket,
			SwtpmUser: cfg.SwtpmUser, SwtpmGroup: cfg.SwtpmGroup, SecretSecurity: cfg.Libvirt.SecretSecurity,
			Swtpm: d.swtpm, Log: d.log,
		})
		if err != nil {
			return fmt.Errorf("libvirt backend: %w", err)
		}
	}
	if cfg.Backend == "xen" {
		if d.host, err = d.startXen(); err != nil {
			return fmt.Errorf("xen backend: %w", err)
		}
	}
	d.records = agentstore.New(d.store)
	d.agent = &agent.Agent{Host: cfg.HostName, Capacity: cfg.Capacity, Records: d.records, Keyring: kr, Backend: d.host, Log: d.log,
		HeartbeatInterval: cfg.HeartbeatInterval}
	if err := d.agent.Register(ctx); err != nil {
		return err
	}
	// Bring back every vTPM that should run before the API answers, so that
	// no phase it reports is left over from before a restart.
	if err := d.agent.Reconcile(ctx); err != nil {
		return fmt.Errorf("restoring vTPMs: %w", err)
	}
	if cfg.libvirtExternal() {
		// Kept swtpm processes were adopted by the pass; the rest go.
		if err := d.sweep(); err != nil {
			return err
		}
	}
	d.reportDrift(ctx)
	verdicts, err := verifier.OpenSigner(ctx, filepath.Join(cfg.DataDir, "verdict-key"), kr)
	if err != nil {
		return fmt.Errorf("opening the verdict signing key: %w", err)
	}
	hostRoots, err := hostEKRoots(cfg.HostEKCA)
	if err != nil {
		return err
	}
	var bg context.Context
	bg, d.stopBackground = context.WithCancel(context.Background())
	var hook *webhook.Webhook
	if cfg.WebhookURL != "" {
		hook = webhook.New(webhook.Config{URL: cfg.WebhookURL, Signer: verdicts, Store: d.store, Log: d.log})
		hook.Start(bg)
	}
	d.ln, err = net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	d.Addr, d.URL = d.ln.Addr().String(), "http://"+d.ln.Addr().String()
	if serving != nil {
		d.URL = "https://" + d.Addr
	}
	if cfg.InsecureListen {
		d.log.Warn("serving the API without TLS or client certificates beyond loopback (--insecure-listen): agents' tokens cross the network in the clear", "listen", d.Addr)
	}
	local, err := listenPrivate(cfg.APISocket)
	if err != nil {
		d.ln.Close()
		return fmt.Errorf("the operator's socket %s: %w", cfg.APISocket, err)
	}
	d.OperatorURL = "unix://" + cfg.APISocket
	hyperV := vtpms.HyperVOptions{PublicURL: cfg.PublicURL, HGS: cfg.HyperVHGS}
	if hyperV.PublicURL == "" {
		hyperV.PublicURL = d.URL
	}
	keys := secrets.New(d.store, kr, d.log)
	vs := vtpms.New(vtpms.Config{HeartbeatWindow: cfg.HeartbeatWindow, Store: d.store, Keyring: kr, Secrets: keys, HyperV: hyperV, Log: d.log,
		Options: spec.Options{DefaultTPMVersion: cfg.DefaultTPMVersion},
		Notify: func(host string) {
			if host == cfg.HostName {
				d.agent.Kick()
			}
		},
	})
	ver := verifier.New(verifier.Config{Store: d.store, VTPMs: vs, CAChainPEM: authority.ChainPEM, HostEKRoots: hostRoots,
		Signer: verdicts, Webhook: hook, StaleAfter: cfg.StaleAfter, Log: d.log})
	enrolment := enrol.New(enrol.Config{Store: d.store, HostCA: hostCA, Log: d.log})
	srv := &server.Server{VTPMs: vs, Verifier: ver, Secrets: keys, Enrolment: enrolment, CAChainPEM: authority.ChainPEM, Log: d.log,
		Drift: d.drift,
	}
	d.http = &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second, TLSConfig: serving,
		ErrorLog: slog.NewLogLogger(d.log.Handler(), slog.LevelWarn)} // TLS handshake failures, as structured logs
	d.http.RegisterOnShutdown(srv.EndLongPolls)
	d.local = &http.Server{Handler: d.http.Handler, ReadHeaderTimeout: 10 * time.Second, ConnContext: server.OperatorConn}
	d.local.RegisterOnShutdown(srv.EndLongPolls)
	go func() {
		if err := d.local.Serve(local); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("operator socket stopped", "err", err)
		}
	}()
	go ver.WatchStale(bg)
	go func() {
		serve := d.http.Serve
		if d.http.TLSConfig != nil {
			serve = func(ln net.Listener) error { return d.http.ServeTLS(ln, "", "") }
		}
		if err := serve(d.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("API server stopped", "err", err)
		}
	}()
	if cfg.HostTPM != "" {
		d.hostTPM = newHostAttester(cfg, d.URL, self, d.log)
		go d.hostTPM.run(bg)
	}
	return nil
}

// Run reconciles until ctx ends; the first pass brings back every vTPM
// that should be running.
func (d *AllInOne) Run(ctx context.Context) error { return d.agent.Run(ctx) }

// Shutdown stops the API, then every vTPM (state kept), then the store.
func (d *AllInOne) Shutdown(ctx context.Context) error {
	if d.stopBackground != nil {
		d.stopBackground()
	}
	errs := []error{d.http.Shutdown(ctx), d.local.Shutdown(ctx), d.swtpm.Close(ctx), d.store.Close()}
	if err := os.Remove(d.cfg.APISocket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	if d.hostTPM != nil {
		errs = append(errs, d.hostTPM.close())
	}
	if d.xenUUID != nil {
		errs = append(errs, d.xenUUID.Shutdown(ctx))
	}
	if lb, ok := d.host.(*libvirt.Backend); ok {
		errs = append(errs, lb.Close())
	}
	return errors.Join(errs...)
}

// listenPrivate listens on a unix socket at path that only this user may
// connect to (0600), from its first moment: the socket is made in a
// private directory beside path and renamed into place, replacing one left
// by an earlier run.
func listenPrivate(path string) (net.Listener, error) {
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".api-sock-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	ln, err := net.Listen("unix", filepath.Join(tmp, "s"))
	if err != nil {
		return nil, err
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false) // Shutdown removes path
	if err := os.Chmod(filepath.Join(tmp, "s"), 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	if err := os.Rename(filepath.Join(tmp, "s"), path); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// openStore opens the configured PostgreSQL database, or else SQLite in
// the data dir.
func openStore(ctx context.Context, cfg Config) (*store.Store, error) {
	if cfg.Store != "" {
		return store.OpenPostgres(ctx, cfg.Store, store.Options{})
	}
	return store.Open(ctx, filepath.Join(cfg.DataDir, "vtpmd.db"), store.Options{})
}

// poolSize is the pool the swtpm runtime keeps: none when it serves the
// libvirt backend, whose agent does not claim from it.
func poolSize(cfg Config) int {
	if cfg.Backend != "swtpm" {
		return 0
	}
	return *cfg.PoolSize
}

// hostBackend is a backend that can also report drift.
type hostBackend interface {
	agent.Backend
	Drift(ctx context.Context, records func(context.Context) ([]agent.VTPM, error), repair bool) ([]api.Finding, error)
}

// drift asks this host's backend for drift against the host's records.
func (d *AllInOne) drift(ctx context.Context, host string, repair bool) (*api.Drift, error) {
	if host != d.cfg.HostName {
		return nil, fmt.Errorf("host %s has no agent in this process", host)
	}
	records := func(ctx context.Context) ([]agent.VTPM, error) {
		rs, err := d.records.List(ctx, host)
		if err != nil {
			return nil, err
		}
		vs := make([]agent.VTPM, len(rs))
		for i, r := range rs {
			vs[i] = r.VTPM()
		}
		return vs, nil
	}
	fs, err := d.host.Drift(ctx, records, repair)
	if err != nil {
		return nil, err
	}
	return &api.Drift{Host: host, Findings: fs}, nil
}

// reportDrift logs what differs between the host and the records; only an
// operator's explicit repair deletes anything.
func (d *AllInOne) reportDrift(ctx context.Context) {
	dr, err := d.drift(ctx, d.cfg.HostName, false)
	if err != nil {
		d.log.Warn("checking drift", "err", err)
		return
	}
	for _, f := range dr.Findings {
		d.log.Warn("drift (vtpmctl doctor lists it; --delete-orphans removes orphans)", "kind", f.Kind, "object", f.Object,
			"instance", f.InstanceID, "detail", f.Detail)
	}
}

// sweep kills swtpm processes that no vTPM here runs.
func (d *AllInOne) sweep() error {
	n, err := d.swtpm.Sweep()
	if err != nil {
		return fmt.Errorf("sweeping stale swtpm processes: %w", err)
	}
	if n > 0 {
		d.log.Warn("killed swtpm processes left by an earlier run", "count", n)
	}
	return nil
}

// Swtpm exposes the host's swtpm runtime (tests look at its processes).
func (d *AllInOne) Swtpm() *swtpmhost.Runtime { return d.swtpm }

// certifier issues EK certificates from the deployment CA with the
// manufacturer, model and version swtpm_setup uses, so tools that accept
// swtpm's own certificates accept these.
type certifier struct{ ca *ca.CA }

func (c certifier) CertifyEK(ctx context.Context, instanceID string, v spec.Version, kind swtpm.EKKind, pub crypto.PublicKey) ([]byte, error) {
	return c.ca.IssueEK(pub, ca.EKProfile{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023", TPMVersion: string(v)})
}

// reclaimSecrets deletes vTPM secrets that no record refers to. A create
// makes the secret before it commits the record, so a crash between the two
// leaves one behind; it runs before the API listens, so no create is in
// flight.
func reclaimSecrets(ctx context.Context, st *store.Store, rt *swtpmhost.Runtime, kr keyring.Keyring, log *slog.Logger) error {
	used, err := rt.AdoptedSecrets() // TPMs adopted from the pool, records not yet updated
	if err != nil {
		return err
	}
	err = st.View(ctx, func(tx *store.Tx) error {
		vs, err := tx.ListVTPMs(store.Filter{})
		if err != nil {
			return err
		}
		for _, v := range vs {
			used[v.SecretID] = true
		}
		tenants, err := tx.Secrets() // stored through the API: not vTPMs'
		for _, id := range tenants {
			used[id] = true
		}
		return err
	})
	if err != nil {
		return err
	}
	ids, err := kr.List(ctx)
	if err != nil {
		return err
	}
	for _, id := range ids {
		if used[id] {
			continue
		}
		s, err := kr.Get(ctx, id)
		if err != nil {
			return err
		}
		if s.Project == ca.KeyProject {
			continue
		}
		if err := kr.Delete(ctx, id); err != nil && !errors.Is(err, keyring.ErrNotFound) {
			return err
		}
		log.Warn("deleted a vTPM secret no record refers to (left by an interrupted create)", "secret", id, "project", s.Project)
	}
	return nil
}
