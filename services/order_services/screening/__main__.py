import sys

from order_services.screening.jobs import main

sys.exit(main())
