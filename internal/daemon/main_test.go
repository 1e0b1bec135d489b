package daemon

import (
	"os"
	"testing"

	"github.com/vtpmd/vtpmd/internal/store/pgtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.Stop()
	os.Exit(code)
}
