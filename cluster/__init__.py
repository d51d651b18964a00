"""Scale-out: several engine replicas behind one endpoint (the routing policy so far)."""
