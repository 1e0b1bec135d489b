package console

import (
	"os"
	"testing"

	"github.com/vtpmd/vtpmd/internal/store/storetest"
)

func TestMain(m *testing.M) { os.Exit(storetest.Main(m)) }
