package daemon

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"time"

	"github.com/vtpmd/vtpmd/internal/agent/agentstore"
	"github.com/vtpmd/vtpmd/internal/broker"
	"github.com/vtpmd/vtpmd/internal/ca"
	"github.com/vtpmd/vtpmd/internal/console"
	"github.com/vtpmd/vtpmd/internal/enrol"
	"github.com/vtpmd/vtpmd/internal/keyring"
	"github.com/vtpmd/vtpmd/internal/keyring/barbican"
	"github.com/vtpmd/vtpmd/internal/keyring/embedded"
	"github.com/vtpmd/vtpmd/internal/keystone"
	"github.com/vtpmd/vtpmd/internal/secrets"
	"github.com/vtpmd/vtpmd/internal/server"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
	"github.com/vtpmd/vtpmd/internal/verifier"
	"github.com/vtpmd/vtpmd/internal/vtpms"
	"github.com/vtpmd/vtpmd/internal/webhook"
)

// Server is a running control plane (vtpmd server): the API, the store,
// the key manager and the CAs. Hosts' agents reach it over the agent
// protocol; all-in-one's agent through the same records, in-process.
type Server struct {
	Addr string // the address the API listens on
	URL  string // the API's URL: http:// or, with TLS, https:// Addr
	// OperatorURL is the operator's local API: unix:// and the socket's path.
	OperatorURL string
	cfg         Config
	log         *slog.Logger
	store       *store.Store
	keyring     *embedded.Keyring
	authority   *ca.CA              // the deployment CA: vTPMs' EK certificates
	agents      *agentstore.Records // what agents read and write
	api         *server.Server
	// self is how this process's own clients trust the API (TLS); nil
	// without TLS.
	self    *tls.Config
	http    *http.Server
	ln      net.Listener
	local   *http.Server // the operator's socket
	localLn net.Listener
	// stopBackground ends work that outlives requests (webhook deliveries,
	// the stale sweeper).
	stopBackground context.CancelFunc
}

// StartServer opens (creating on first start) everything under
// cfg.DataDir and the store, and serves the API. Stop it with Shutdown.
func StartServer(ctx context.Context, cfg Config, log *slog.Logger) (*Server, error) {
	s, err := openServer(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	s.serve()
	return s, nil
}

// openServer opens the server's parts and binds its addresses, without
// serving the API yet: callers wait in the listen backlog.
func openServer(ctx context.Context, cfg Config, log *slog.Logger) (*Server, error) {
	cfg.Defaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := privateDir(cfg.DataDir); err != nil {
		return nil, err
	}
	st, err := openStore(ctx, cfg)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: log, store: st}
	if err := s.open(ctx); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// privateDir makes dir, private even when it existed before (a mkdir -p
// with the default umask makes 0755): it holds the operator's socket and
// the keys.
func privateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("making the data dir private: %w", err)
	}
	return nil
}

func (s *Server) open(ctx context.Context) error {
	cfg := s.cfg
	// TLS first: a bad certificate must stop the start before anything
	// runs. The client CAs need the hosts' CA, from the keys, and are
	// checked once that is open, before anything serves.
	var serving *tls.Config
	if cfg.TLSCert != "" {
		var err error
		if serving, s.self, err = tlsConfigs(cfg.TLSCert, cfg.TLSKey, s.log); err != nil {
			return fmt.Errorf("TLS certificate and key: %w", err)
		}
	}
	identity, err := keystoneIdentity(cfg, s.log)
	if err != nil {
		return err
	}
	kr, shared, err := openKeys(ctx, cfg, s.store, s.log)
	if err != nil {
		return err
	}
	s.keyring, s.authority = kr, shared.ekCA
	km, err := keyManager(ctx, cfg, kr, s.log)
	if err != nil {
		return err
	}
	hostCA := shared.hostCA
	if serving != nil {
		// Hosts' agents (host CA), tenants and the operator (--client-ca)
		// may each present a certificate; it is checked if given, and the
		// routes say whose they require (internal/server, auth.go). Guest
		// agents have none: they prove themselves per request (tokens).
		if err := verifyClients(serving, cfg.ClientCA, hostCA.Certificate(), s.log); err != nil {
			return err
		}
	}
	if err := s.bind(); err != nil {
		return err
	}
	if err := reclaimSecrets(ctx, s.store, km, orphanAge, s.log); err != nil {
		return fmt.Errorf("reclaiming orphan secrets: %w", err)
	}
	verdicts := shared.verdicts
	hostRoots, err := hostEKRoots(cfg.HostEKCA)
	if err != nil {
		return err
	}
	var bg context.Context
	bg, s.stopBackground = context.WithCancel(context.Background())
	// Background work is done once by the servers sharing the store: each
	// delivery and the stale sweep by whichever holds its claim or lease,
	// which name this process.
	replica := replicaName()
	var hook *webhook.Webhook
	if cfg.WebhookURL != "" {
		hook = webhook.New(webhook.Config{URL: cfg.WebhookURL, Signer: verdicts, Store: s.store, Replica: replica, Log: s.log})
		hook.Start(bg)
	}
	hyperV := vtpms.HyperVOptions{PublicURL: cfg.PublicURL, HGS: cfg.HyperVHGS}
	if hyperV.PublicURL == "" {
		hyperV.PublicURL = s.URL
	}
	keys := secrets.New(s.store, km, s.log)
	vs := vtpms.New(vtpms.Config{HeartbeatWindow: cfg.HeartbeatWindow, BackupKeep: cfg.BackupKeep, Store: s.store, Keyring: km, Staging: kr, Secrets: keys, HyperV: hyperV, Log: s.log,
		Options: spec.Options{DefaultTPMVersion: cfg.DefaultTPMVersion}})
	ver := verifier.New(verifier.Config{Store: s.store, VTPMs: vs, CAChainPEM: s.authority.ChainPEM, HostEKRoots: hostRoots,
		Signer: verdicts, TicketKey: shared.ticketKey, Webhook: hook, StaleAfter: cfg.StaleAfter, Replica: replica, Log: s.log})
	s.agents = agentstore.New(s.store, km, kr, s.log)
	s.api = &server.Server{VTPMs: vs, Verifier: ver, Secrets: keys, Broker: broker.New(broker.Config{Store: s.store, Keyring: km, Verifier: ver, Log: s.log}),
		Enrolment: enrol.New(enrol.Config{Store: s.store, HostCA: hostCA, Log: s.log, BoundEnrolment: ver.BoundEnrolment}),
		Agents:    s.agents, EKCA: s.authority, CAChainPEM: s.authority.ChainPEM, StoreStats: s.store, Log: s.log,
		Readiness: s.readiness(kr), Identity: identity}
	// HTTP/2 for many long-lived connections that each carry a request
	// every few seconds (hosts' agents: a watch always waiting, a
	// heartbeat every 10 s). Each keeps, while it is open, a header
	// compression table each way, which fills with its requests' paths
	// and its responses' dates: 512 bytes here, where HTTP/2's default is
	// 4 KiB; and a buffer the size of the largest frame it has read:
	// frames are read of at most 16 KiB (HTTP/2's default; Go's server
	// takes 1 MiB).
	h2 := &http.HTTP2Config{MaxDecoderHeaderTableSize: 512, MaxEncoderHeaderTableSize: 512, MaxReadFrameSize: 16 << 10}
	conf := console.Config{Store: s.store, VTPMs: vs, Verifier: ver, Authenticate: s.api.BrowserViewer, PublicURL: hyperV.PublicURL, Log: s.log}
	if identity != nil {
		conf.SignIn, conf.SignOut = s.api.KeystoneSignIn, s.api.KeystoneSignOut
	}
	con := console.New(conf)
	s.api.Console = con
	s.http = &http.Server{Handler: s.api.Handler(), ReadHeaderTimeout: 10 * time.Second, TLSConfig: serving, HTTP2: h2,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)} // as structured logs
	s.http.RegisterOnShutdown(s.api.EndLongPolls)
	// The operator's socket serves Go's profiles too (net/http/pprof):
	// where a server's memory and time go, for its operator alone.
	local := http.NewServeMux()
	local.HandleFunc("/debug/pprof/", pprof.Index)
	local.HandleFunc("/debug/pprof/profile", pprof.Profile)
	local.HandleFunc("/debug/pprof/trace", pprof.Trace)
	local.Handle("/", s.http.Handler)
	s.local = &http.Server{Handler: local, ReadHeaderTimeout: 10 * time.Second, ConnContext: server.OperatorConn}
	s.local.RegisterOnShutdown(s.api.EndLongPolls)
	s.http.RegisterOnShutdown(con.Close)
	s.local.RegisterOnShutdown(con.Close)
	go ver.WatchStale(bg)
	go reclaimOrphans(bg, s.store, km, vs, replica, reclaimInterval, orphanAge, s.log)
	if *cfg.BackupInterval > 0 {
		go vs.RunBackups(bg, replica, *cfg.BackupInterval)
	}
	return nil
}

// replicaName names this server process in the claims and leases it holds
// in the store, for an operator reading them: its host's name, its pid,
// and random hex that a later process with the same pid does not repeat.
func replicaName() string {
	host, _ := os.Hostname()
	b := make([]byte, 4)
	rand.Read(b)
	return fmt.Sprintf("%s/%d/%x", host, os.Getpid(), b)
}

// bind listens on the network address and the operator's socket.
func (s *Server) bind() error {
	cfg := s.cfg
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	local, err := listenPrivate(cfg.APISocket)
	if err != nil {
		ln.Close()
		return fmt.Errorf("the operator's socket %s: %w", cfg.APISocket, err)
	}
	s.ln, s.localLn = ln, local
	s.Addr, s.URL = ln.Addr().String(), "http://"+ln.Addr().String()
	if s.self != nil {
		s.URL = "https://" + s.Addr
	}
	s.OperatorURL = "unix://" + cfg.APISocket
	return nil
}

// serve answers the API on the addresses bound.
func (s *Server) serve() {
	s.log.Info("web console", "url", s.URL+"/ui/", "sign-in", "vtpmctl --server "+s.OperatorURL+" console")
	if s.cfg.InsecureListen {
		s.log.Warn("serving the API without TLS or client certificates beyond loopback (--insecure-listen): agents' tokens cross the network in the clear", "listen", s.Addr)
	}
	go func() {
		if err := s.local.Serve(s.localLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("operator socket stopped", "err", err)
		}
	}()
	go func() {
		ln := s.ln
		if s.http.TLSConfig != nil {
			ln = listenTLS(ln, s.http.TLSConfig, s.log)
		}
		if err := s.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("API server stopped", "err", err)
		}
	}()
}

// Shutdown stops the API, then background work, then the store.
func (s *Server) Shutdown(ctx context.Context) error {
	errs := []error{s.http.Shutdown(ctx), s.local.Shutdown(ctx)}
	if err := os.Remove(s.cfg.APISocket); err != nil && !errors.Is(err, fs.ErrNotExist) {
		errs = append(errs, err)
	}
	return errors.Join(append(errs, s.close())...)
}

// close stops background work, the listeners (if not served yet) and the
// store.
func (s *Server) close() error {
	if s.stopBackground != nil {
		s.stopBackground()
	}
	if s.ln != nil {
		s.ln.Close()
		s.localLn.Close()
	}
	return s.store.Close()
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

// readiness are the checks of GET /readyz: the database answers, its
// schema is current, the store's keys are sealed under the master key kr
// holds (or its file now holds, after a rotation).
func (s *Server) readiness(kr *embedded.Keyring) []server.ReadinessCheck {
	unreachable := func(what string, err error) error {
		s.log.Warn("not ready: "+what, "err", err)
		return errors.New("the database does not answer")
	}
	return []server.ReadinessCheck{
		{Name: "database", Check: func(ctx context.Context) error {
			if err := s.store.Ping(ctx); err != nil {
				return unreachable("database", err)
			}
			return nil
		}},
		{Name: "schema", Check: func(ctx context.Context) error {
			err := s.store.SchemaCurrent(ctx)
			if err != nil && !errors.Is(err, store.ErrSchemaNewer) && !errors.Is(err, store.ErrSchemaOlder) {
				return unreachable("schema", err)
			}
			return err
		}},
		{Name: "keys", Check: func(ctx context.Context) error {
			err := kr.Check(ctx)
			if err != nil && !errors.Is(err, keyring.ErrMasterKeyMismatch) && !errors.Is(err, keyring.ErrBadMasterKey) && !errors.Is(err, keyring.ErrInsecureMode) {
				return unreachable("keys", err)
			}
			return err
		}},
	}
}

// orphanAge is how old a secret no record refers to must be before
// reclaimSecrets deletes it: a create (or an agent's rekey) makes its secret
// moments before it commits the record naming it, possibly on another
// server sharing the store, so a younger one may be in flight. A variable
// so that tests can age their orphans.
var orphanAge = 10 * time.Minute

// reclaimInterval is how often the servers sharing a store look for orphan
// secrets and abandoned transfers while they run (reclaimOrphans): an
// orphan secret is gone within orphanAge and reclaimInterval of its
// making. A variable so that tests need not wait.
var reclaimInterval = 10 * time.Minute

// orphanSweep names the lease (store.Tx.TakeLease) of the periodic reclaim
// of orphans: of the servers sharing a store, the one holding it reclaims.
const orphanSweep = "orphans"

// reclaimOrphans runs reclaimSecrets (orphans older than age) and removes
// the abandoned requests to hosts' agents (vtpms.Service.SweepTransfers)
// every interval until ctx ends, on whichever server sharing the store
// holds its lease (each round takes or renews it for three rounds).
// Reclaiming at start alone is not enough with several replicas: one
// killed mid-create is restarted at once, before its orphan is old
// enough, and the others may run for months.
func reclaimOrphans(ctx context.Context, st *store.Store, kr keyring.Keyring, vs *vtpms.Service, replica string, every, age time.Duration, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var held bool
		err := st.Update(ctx, func(tx *store.Tx) (err error) {
			held, err = tx.TakeLease(orphanSweep, replica, 3*every)
			return err
		})
		if err != nil || !held {
			if err != nil && ctx.Err() == nil {
				log.Error("taking the orphans' lease", "err", err)
			}
			continue
		}
		if err := reclaimSecrets(ctx, st, kr, age, log); err != nil && ctx.Err() == nil {
			log.Error("reclaiming orphan secrets", "err", err)
		}
		if _, err := vs.SweepTransfers(ctx); err != nil && ctx.Err() == nil {
			log.Error("sweeping abandoned transfers", "err", err)
		}
	}
}

// reclaimSecrets deletes vTPM secrets that no record refers to, older than
// age (orphanAge, but in tests), and staged secrets that expired. A create
// makes the secret before it commits the record, so a crash between the
// two leaves one behind. With Barbican these are the secrets vtpmd's
// service user made in its project (deployment vTPMs', tenants'); a
// secret of a user or host vTPM is in its owner's project, which vtpmd
// cannot list: the create that made it deletes it again when its record
// fails (and its retries' duplicates), but one left by a crash stays there
// for its owner to delete.
func reclaimSecrets(ctx context.Context, st *store.Store, kr keyring.Keyring, age time.Duration, log *slog.Logger) error {
	ctx = keyring.AsService(ctx)
	used := map[string]bool{}
	err := st.Update(ctx, func(tx *store.Tx) error {
		if _, err := tx.DropExpiredStaged(time.Now()); err != nil {
			return err
		}
		vs, err := tx.ListVTPMs(store.Filter{})
		if err != nil {
			return err
		}
		for _, v := range vs {
			used[v.SecretID] = true
			if v.Resize != nil {
				used[v.Resize.OldSecretID] = true // the old TPM a resize keeps
			}
		}
		tenants, err := tx.Secrets() // stored through the API: not vTPMs'
		if err != nil {
			return err
		}
		brokered, err := tx.BrokerSecretKeys() // the key broker's payloads
		for _, id := range append(tenants, brokered...) {
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
		if errors.Is(err, keyring.ErrNotFound) {
			continue // shredded meanwhile
		}
		if err != nil {
			return err
		}
		if time.Since(s.Created) < age {
			continue
		}
		if err := kr.Delete(ctx, id); err != nil && !errors.Is(err, keyring.ErrNotFound) {
			return err
		}
		log.Warn("deleted a vTPM secret no record refers to (left by an interrupted create)", "secret", id, "project", s.Project)
	}
	return nil
}

// keystoneIdentity is Keystone authentication as cfg asks for it: nil
// unless Auth is keystone. It reads the service user's credentials file
// but does not reach Keystone: a Keystone down at start is a 503 per
// request, as one going down later is.
func keystoneIdentity(cfg Config, log *slog.Logger) (*server.Identity, error) {
	if cfg.Auth != "keystone" {
		return nil, nil
	}
	session, client, err := serviceSession(cfg)
	if err != nil {
		return nil, err
	}
	log.Info("keystone authentication", "keystone", cfg.KeystoneURL, "service_user", session.Credentials().String(), "cache_ttl", cfg.KeystoneCacheTTL)
	return &server.Identity{
		Tokens:       keystone.NewValidator(session, keystone.ValidatorOptions{TTL: cfg.KeystoneCacheTTL}),
		AdminProject: cfg.KeystoneAdminProject,
		URL:          cfg.KeystoneURL,
		Client:       client,
	}, nil
}

// keyManager is the key manager of vTPMs' and tenants' secrets cfg names:
// the embedded one, kr, or Barbican as vtpmd's service user (whose
// credentials file it reads; with no --barbican-url it asks Keystone's
// catalog for the key-manager endpoint, so Keystone must answer at start).
func keyManager(ctx context.Context, cfg Config, kr *embedded.Keyring, log *slog.Logger) (keyring.Keyring, error) {
	if cfg.KeyManager != "barbican" {
		return kr, nil
	}
	session, client, err := serviceSession(cfg)
	if err != nil {
		return nil, err
	}
	url := cfg.BarbicanURL
	if url == "" {
		if url, err = session.Endpoint(ctx, "key-manager"); err != nil {
			return nil, fmt.Errorf("finding barbican in the keystone catalog: %w", err)
		}
	}
	log.Info("key manager: barbican", "barbican", url, "service_user", session.Credentials().String())
	return barbican.New(barbican.Config{URL: url, Service: session, Client: client, Log: log})
}

// serviceSession is vtpmd's own Keystone session, from the service user's
// credentials file cfg names, and the HTTP client for Keystone and the
// services of its catalog (trusting the file's cacert, if any).
func serviceSession(cfg Config) (*keystone.Session, *http.Client, error) {
	creds, err := keystone.ReadCredentialsFile(cfg.KeystoneCredentialsFile)
	if err != nil {
		return nil, nil, fmt.Errorf("keystone service credentials: %w", err)
	}
	creds.AuthURL = cfg.KeystoneURL
	if err := creds.Check(); err != nil {
		return nil, nil, fmt.Errorf("keystone service credentials %s: %w", cfg.KeystoneCredentialsFile, err)
	}
	client, err := creds.HTTPClient(10 * time.Second)
	if err != nil {
		return nil, nil, fmt.Errorf("keystone service credentials %s: %w", cfg.KeystoneCredentialsFile, err)
	}
	return keystone.NewSession(creds, client), client, nil
}
