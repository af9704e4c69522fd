"""Kubernetes CRI: the image-service proxy that carries kubelet's pull secrets to clip.

kubelet sends a pod's imagePullSecrets only in the CRI ``PullImage`` request, which goes to
containerd's CRI plugin; containerd uses them for the manifests and for the layers *it*
downloads, but lazy layers are fetched later by clip's own registry client, which never saw
them. With ``[cri] image_service_address`` set, ``clip serve`` answers the CRI ImageService on
that socket (kubelet's ``--image-service-endpoint``), remembers each pull's credentials for
the pulled repository (:mod:`snapshotter.cri.keychain`), and forwards every call unchanged to
containerd (:mod:`snapshotter.cri.proxy`). ``ImageFsInfo`` also counts clip's own storage, so
kubelet's image garbage collection sees it (:mod:`snapshotter.cri.fsinfo`).
"""
