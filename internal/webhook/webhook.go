// Package webhook delivers attestation verdict changes to the operator's
// receiver. A change is queued in the store's outbox in the transaction
// that makes it (Enqueue), so a crash or restart loses none; the deliverer
// (Start) posts each as {"token": <signed verdict>}: the same ES256 JWT as
// GET …/attestation/token, so a receiver authenticates it with the
// verifier's JWKS. A failed delivery is retried with backoff, and holds
// back the instance's later ones: a receiver acts on the latest verdict.
//
// Several servers may share one outbox (one PostgreSQL): each deliverer
// claims a few deliveries at a time, for a lease, and only the first
// waiting one of each instance, so every delivery is made by one server
// and an instance's in the order they were queued. A server that dies
// with claims leaves them to the others when the lease runs out. The
// receiver may then get a delivery it already had (the server died after
// posting it, before recording it): every attempt at a delivery carries
// the same id, in the X-Vtpmd-Delivery header and the token's jti, for
// the receiver to drop the repeat.
package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/attest"
	"github.com/vtpmd/vtpmd/internal/store"
)

// Config is where and how a Webhook delivers.
type Config struct {
	// URL receives every verdict change.
	URL string
	// Signer signs the claims of each delivery as it is made.
	Signer *attest.Signer
	Store  *store.Store
	// Replica names this server in the claims it holds; default a random
	// id.
	Replica string
	// Lease is how long a claim lasts: a server that dies mid-delivery
	// holds its deliveries up that long; default 30 s. Each attempt is cut
	// off after half of it, so that it is over before another server may
	// take the delivery over.
	Lease time.Duration
	// Log (nil: silent) records failed and abandoned deliveries.
	Log *slog.Logger
	// Client defaults to one with a 10 s timeout. Whichever it is, it is
	// made to refuse redirects (see noRedirects).
	Client *http.Client
	// Backoff is the first retry's delay, doubling each time; default 500 ms.
	Backoff time.Duration
	// Attempts bounds the tries per notification; default 10 (≈ 4 min).
	Attempts int
	// Now is the clock that dates the tokens; default time.Now. (The
	// outbox's times are the store's.)
	Now func() time.Time
}

// Webhook is an outbox and its deliverer. A nil *Webhook is no webhook:
// Enqueue does nothing.
type Webhook struct {
	cfg    Config
	client http.Client
}

// claimBatch is how many deliveries (of as many instances) a deliverer
// claims, and makes at once.
const claimBatch = 16

// idle is how long a deliverer with nothing to claim waits at most. A
// commit that changes the outbox, on any server, wakes it
// (store.OutboxChanged); a notification lost while the store's listener
// reconnects is found by looking again now and then.
const idle = time.Minute

// busy is how long a deliverer waits when a delivery due now could not be
// claimed: another server is claiming it at this moment.
const busy = 50 * time.Millisecond

// New returns a Webhook for cfg; nothing is delivered until Start.
func New(cfg Config) *Webhook {
	h := &Webhook{cfg: cfg, client: http.Client{Timeout: 10 * time.Second}}
	if cfg.Client != nil {
		h.client = *cfg.Client
	}
	h.client.CheckRedirect = noRedirects
	if h.cfg.Replica == "" {
		h.cfg.Replica = uuid.NewString()
	}
	if h.cfg.Lease == 0 {
		h.cfg.Lease = 30 * time.Second
	}
	if h.cfg.Backoff == 0 {
		h.cfg.Backoff = 500 * time.Millisecond
	}
	if h.cfg.Attempts == 0 {
		h.cfg.Attempts = 10
	}
	if h.cfg.Log == nil {
		h.cfg.Log = slog.New(slog.DiscardHandler)
	}
	if h.cfg.Now == nil {
		h.cfg.Now = time.Now
	}
	return h
}

// Start delivers until ctx ends, beginning with what a previous run (or
// another server) left.
func (h *Webhook) Start(ctx context.Context) {
	go func() {
		for {
			changed := h.cfg.Store.OutboxChanged() // before looking, so that no commit is missed
			wait := h.deliverDue(ctx)
			select {
			case <-ctx.Done():
				return
			case <-changed:
			case <-time.After(wait):
			}
		}
	}()
}

// Enqueue adds a verdict change (the claims its token will carry, sub
// naming the instance) to the outbox within tx: it is delivered if and
// only if tx commits, after the instance's earlier ones.
func (h *Webhook) Enqueue(tx *store.Tx, claims map[string]any) error {
	if h == nil {
		return nil
	}
	sub, _ := claims["sub"].(string)
	if sub == "" {
		return fmt.Errorf("queueing a webhook: the claims name no instance (sub): %v", claims)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return err
	}
	return tx.Enqueue(sub, payload)
}

// deliverDue claims and makes the deliveries that are due, a batch at a
// time (each of another instance, made at once), until none is left to
// claim, and returns how long until it should look again.
func (h *Webhook) deliverDue(ctx context.Context) time.Duration {
	for ctx.Err() == nil {
		var claimed []store.Delivery
		var next time.Time
		var waiting bool
		err := h.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
			if claimed, err = tx.ClaimDeliveries(h.cfg.Replica, h.cfg.Lease, claimBatch); err != nil || len(claimed) > 0 {
				return err
			}
			next, waiting, err = tx.NextClaim()
			return err
		})
		switch {
		case err != nil:
			if ctx.Err() == nil {
				h.cfg.Log.Error("claiming webhook deliveries", "err", err)
			}
			return time.Second
		case len(claimed) == 0 && !waiting:
			return idle
		case len(claimed) == 0:
			return min(max(time.Until(next), busy), idle)
		}
		var wg sync.WaitGroup
		for _, d := range claimed {
			wg.Go(func() { h.attempt(ctx, d) })
		}
		wg.Wait()
	}
	return 0
}

// attempt makes one attempt at a claimed delivery and records how it went:
// delivered, given up, or to retry after a backoff. When ctx ends first it
// records nothing (it was no attempt): the claim runs out, and the
// delivery is made again, by whichever server claims it next.
func (h *Webhook) attempt(ctx context.Context, d store.Delivery) {
	post, cancel := context.WithTimeout(ctx, h.cfg.Lease/2)
	err := h.deliver(post, d)
	cancel()
	if err != nil && ctx.Err() != nil {
		return
	}
	attempts := d.Attempts + 1
	switch {
	case err == nil:
	case attempts >= h.cfg.Attempts:
		h.cfg.Log.Error("webhook delivery given up", "url", h.cfg.URL, "delivery", d.DeliveryID, "instance", d.InstanceID, "attempts", attempts, "err", err)
	default:
		h.cfg.Log.Warn("webhook delivery failed", "url", h.cfg.URL, "delivery", d.DeliveryID, "instance", d.InstanceID, "attempt", attempts, "err", err)
	}
	retry := err != nil && attempts < h.cfg.Attempts
	var held bool
	uerr := h.cfg.Store.Update(ctx, func(tx *store.Tx) (err error) {
		if retry {
			held, err = tx.Retry(d.ID, h.cfg.Replica, h.cfg.Backoff<<(attempts-1))
		} else {
			held, err = tx.Delivered(d.ID, h.cfg.Replica)
		}
		return err
	})
	switch {
	case uerr != nil:
		h.cfg.Log.Error("recording a webhook delivery; it is made again once its claim runs out", "delivery", d.DeliveryID, "err", uerr)
	case !held:
		h.cfg.Log.Warn("a webhook delivery's claim ran out before it was recorded; another server took it over", "delivery", d.DeliveryID, "instance", d.InstanceID)
	}
}

// deliver signs the claims as of now (a delivery late after retries still
// carries a valid token; verified_at says when the verdict was reached),
// with the delivery's id as jti, and posts them.
func (h *Webhook) deliver(ctx context.Context, d store.Delivery) error {
	var claims map[string]any
	dec := json.NewDecoder(bytes.NewReader(d.Payload))
	dec.UseNumber()
	if err := dec.Decode(&claims); err != nil {
		return fmt.Errorf("decoding an outbox payload: %w", err)
	}
	now := h.cfg.Now()
	claims["iat"], claims["exp"] = now.Unix(), now.Add(attest.TokenLifetime).Unix()
	claims["jti"] = d.DeliveryID
	tok, err := h.cfg.Signer.Sign(claims)
	if err != nil {
		return err
	}
	body, _ := json.Marshal(api.VerdictToken{Token: tok})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.cfg.URL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(api.WebhookDeliveryHeader, d.DeliveryID)
	resp, err := h.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode/100 == 3 {
		return fmt.Errorf("status %d redirecting to %q: %w", resp.StatusCode, resp.Header.Get("Location"), errRedirect)
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// errRedirect is a receiver's redirect, which a delivery never follows.
var errRedirect = errors.New("webhook redirects are not followed: the signed verdict goes only to the configured URL")

// noRedirects keeps a delivery at the configured URL. A redirect would hand
// the signed verdict to wherever the receiver (or whoever answers in its
// place) points; a 307 or 308 would re-post the body there. The redirect
// comes back as the response, and a failed delivery, retried as any other.
func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
