package server

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/vtpmd/vtpmd/api"
	"github.com/vtpmd/vtpmd/internal/spec"
	"github.com/vtpmd/vtpmd/internal/store"
)

// TestLiveMigrateNoValidHost: a live migration to a named host that
// lacks a trait the vTPM needs (the TPM model its flavor asks for) is
// refused with 409 no_valid_host, naming the trait, before anything moves:
// the vTPM's record is as it was, no migration is recorded, nothing is
// asked of either host, and no event is written.
func TestLiveMigrateNoValidHost(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	tisOnly := spec.Capabilities{Enabled: true, Versions: []spec.Version{spec.V20}, Models: []spec.Model{spec.TIS}}
	err := f.store.Update(ctx, func(tx *store.Tx) error {
		h, err := tx.GetHost("h1")
		if err != nil {
			return err
		}
		h.Backend = "libvirt"
		if err := tx.PutHost(h); err != nil {
			return err
		}
		return tx.PutHost(&store.Host{Name: "h2", Traits: spec.HostTraits(tisOnly).List(), Capacity: 2, Backend: "libvirt"})
	})
	if err != nil {
		t.Fatal(err)
	}
	if code := f.call(t, "POST", "/v1/vtpms", "", create(inst, map[string]string{"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"}), nil); code != 202 {
		t.Fatalf("create: %d", code)
	}
	path := "/v1/vtpms/" + inst
	var v api.VTPM
	if code := f.call(t, "POST", path+"/attach", "", api.AttachRequest{Domain: "guest1"}, &v); code != 202 || v.Host != "h1" {
		t.Fatalf("attach: %d %+v", code, v)
	}
	f.manufactured(t, inst) // the guest runs with it
	var before api.VTPM
	f.call(t, "GET", path, "", nil, &before)
	var evsBefore api.EventList
	f.call(t, "GET", path+"/events", "", nil, &evsBefore)

	var e api.ErrorBody
	code := f.call(t, "POST", path+"/live-migrate", "", api.LiveMigrateRequest{Host: "h2"}, &e)
	if code != 409 || e.Error.Code != api.CodeNoValidHost || !strings.Contains(e.Error.Message, "COMPUTE_SECURITY_TPM_CRB") {
		t.Fatalf("live-migrate to a host without the TPM model: %d %+v; want 409 %s naming the trait", code, e.Error, api.CodeNoValidHost)
	}

	var after api.VTPM
	if code := f.call(t, "GET", path, "", nil, &after); code != 200 || !reflect.DeepEqual(after, before) {
		t.Fatalf("the vTPM after the refusal: %d %+v; before: %+v", code, after, before)
	}
	var evsAfter api.EventList
	if f.call(t, "GET", path+"/events", "", nil, &evsAfter); !reflect.DeepEqual(evsAfter, evsBefore) {
		t.Fatalf("events after the refusal: %+v; before: %+v", evsAfter.Items, evsBefore.Items)
	}
	err = f.store.View(ctx, func(tx *store.Tx) error {
		if _, err := tx.GetMigration(inst); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("a migration is recorded after the refusal (%v)", err)
		}
		for _, host := range []string{"h1", "h2"} {
			for _, kind := range []string{store.TransferPrepare, store.TransferSend, store.TransferAbort, store.TransferCancel} {
				if asked, err := tx.TransferAsked(host, inst, kind); err != nil || asked {
					t.Errorf("a %s asked of %s after the refusal (%v)", kind, host, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
