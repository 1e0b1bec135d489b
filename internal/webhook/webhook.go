// Package webhook delivers attestation verdict changes to the operator's
// receiver. A change is queued in the store's outbox in the transaction
// that makes it (Enqueue), so a crash or restart loses none; the deliverer
// (Start) posts them in order, each as {"token": <signed verdict>}: the
// same ES256 JWT as GET …/attestation/token, so a receiver authenticates
// it with the verifier's JWKS. A failed delivery is retried with backoff,
// and holds back those queued after it: a receiver acts on the latest
// verdict.
package webhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

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
	// Log (nil: silent) records failed and abandoned deliveries.
	Log *slog.Logger
	// Client defaults to one with a 10 s timeout. Whichever it is, it is
	// made to refuse redirects (see noRedirects).
	Client *http.Client
	// Backoff is the first retry's delay, doubling each time; default 500 ms.
	Backoff time.Duration
	// Attempts bounds the tries per notification; default 10 (≈ 4 min).
	Attempts int
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Webhook is an outbox and its deliverer. A nil *Webhook is no webhook:
// Enqueue and Wake do nothing.
type Webhook struct {
	cfg    Config
	client http.Client
	kick   chan struct{}
}

// New returns a Webhook for cfg; nothing is delivered until Start.
func New(cfg Config) *Webhook {
	h := &Webhook{cfg: cfg, client: http.Client{Timeout: 10 * time.Second}, kick: make(chan struct{}, 1)}
	if cfg.Client != nil {
		h.client = *cfg.Client
	}
	h.client.CheckRedirect = noRedirects
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

// Start delivers until ctx ends, beginning with what a previous run left.
func (h *Webhook) Start(ctx context.Context) {
	go func() {
		for {
			wait := h.deliverDue(ctx)
			select {
			case <-ctx.Done():
				return
			case <-h.kick:
			case <-time.After(wait):
			}
		}
	}()
}

// Enqueue adds a verdict change (the claims its token will carry) to the
// outbox within tx: it is delivered if and only if tx commits.
func (h *Webhook) Enqueue(tx *store.Tx, claims map[string]any) error {
	if h == nil {
		return nil
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return err
	}
	return tx.Enqueue(payload)
}

// Wake tells the deliverer that the outbox has news, once the transaction
// that queued it committed.
func (h *Webhook) Wake() {
	if h == nil {
		return
	}
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// deliverDue sends the waiting deliveries in order, and returns how long
// until it should try again. Order matters to a receiver that acts on the
// latest verdict, so a failing delivery holds back those queued after it.
func (h *Webhook) deliverDue(ctx context.Context) time.Duration {
	for ctx.Err() == nil {
		var waiting []store.Delivery
		if err := h.cfg.Store.View(ctx, func(tx *store.Tx) (err error) { waiting, err = tx.Deliveries(64); return err }); err != nil {
			h.cfg.Log.Error("reading the webhook outbox", "err", err)
			return time.Second
		}
		if len(waiting) == 0 {
			return time.Minute
		}
		for _, d := range waiting {
			if wait := d.NextAt.Sub(h.cfg.Now()); wait > 0 {
				return wait
			}
			err := h.deliver(ctx, d.Payload)
			if err != nil && ctx.Err() != nil {
				return 0 // shutting down: not an attempt
			}
			attempts := d.Attempts + 1
			switch {
			case err == nil:
			case attempts >= h.cfg.Attempts:
				h.cfg.Log.Error("webhook delivery given up", "url", h.cfg.URL, "attempts", attempts, "err", err)
			default:
				h.cfg.Log.Warn("webhook delivery failed", "url", h.cfg.URL, "attempt", attempts, "err", err)
			}
			retry := err != nil && attempts < h.cfg.Attempts
			backoff := h.cfg.Backoff << (attempts - 1)
			uerr := h.cfg.Store.Update(ctx, func(tx *store.Tx) error {
				if retry {
					return tx.Retry(d.ID, h.cfg.Now().Add(backoff))
				}
				return tx.Delivered(d.ID)
			})
			if uerr != nil {
				h.cfg.Log.Error("updating the webhook outbox", "err", uerr)
				return time.Second
			}
			if retry {
				return backoff
			}
		}
	}
	return 0
}

// deliver signs the claims as of now (a delivery late after retries still
// carries a valid token; verified_at says when the verdict was reached)
// and posts them.
func (h *Webhook) deliver(ctx context.Context, payload []byte) error {
	var claims map[string]any
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	if err := dec.Decode(&claims); err != nil {
		return fmt.Errorf("decoding an outbox payload: %w", err)
	}
	now := h.cfg.Now()
	claims["iat"], claims["exp"] = now.Unix(), now.Add(attest.TokenLifetime).Unix()
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
