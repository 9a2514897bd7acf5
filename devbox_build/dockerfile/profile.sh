# /etc/profile.d/devbox.sh (a link to /opt/devbox/profile.sh). Debian's /etc/profile resets PATH for
# login shells (bash -l, Studio and VS Code terminals, ssh); put the image's environment back.
case ":$PATH:" in
    *":/opt/venv/bin:"*) ;;
    *) PATH="/opt/venv/bin:/opt/devbox/bin:$PATH"; export PATH ;;
esac
