"""Scale-out: several engine replicas on Ray behind one endpoint."""
