"""The mutating side: what PrepareUnplug and ReleaseUnplug change on the guest.

leases.py  leases: functions held ready for unplug until released or expired
claims.py  exclusive (O_EXCL) claims on block devices, by device number
links.py   network interfaces set down and up again (a lease's option)
prepare.py what PrepareUnplug does with a request: names resolved, a new lease or a renewal
"""
