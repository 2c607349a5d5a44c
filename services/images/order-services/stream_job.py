"""The streaming job as the file Spark's driver runs on the kubernetes target
(local:///opt/order-services/stream_job.py): order_services.screening.stream."""

from order_services.screening.stream import main

raise SystemExit(main())
